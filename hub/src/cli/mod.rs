//! The CLI's commands that are more than one call: the admin-API client and its credentials,
//! rollouts, keys, API tokens and login.

pub(crate) mod client;
pub(crate) mod keys;
pub(crate) mod rollout;
pub(crate) mod tokens;
