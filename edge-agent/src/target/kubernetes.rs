//! The Kubernetes API through kube-rs: discovery resolves each object's resource (plural,
//! scope), server-side apply writes it, plain GET/LIST/DELETE do the rest. Requests are built
//! with `kube::core::Request` and answered as JSON values, so objects pass through untouched.

use std::path::PathBuf;
use std::time::Duration;

use kube::core::params::{DeleteParams, GetParams, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::{ApiCapabilities, Scope};
use serde_json::Value;
use tokio::sync::RwLock;

use super::{ClusterTarget, ObjectRef, TargetError};

pub use super::ClusterSource;

/// k3s writes its admin kubeconfig here.
pub const K3S_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";

/// A cluster reached through its API.
pub struct KubernetesTarget {
    client: kube::Client,
    default_namespace: String,
    discovery: RwLock<Option<kube::Discovery>>,
}

impl std::fmt::Debug for KubernetesTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesTarget")
            .field("default_namespace", &self.default_namespace)
            .finish_non_exhaustive()
    }
}

fn config_error(error: impl std::fmt::Display) -> TargetError {
    TargetError::Other(format!("cluster credentials: {error}"))
}

impl KubernetesTarget {
    /// Connects (lazily: nothing is sent until the first request) with credentials from `source`.
    pub async fn connect(source: &ClusterSource) -> Result<KubernetesTarget, TargetError> {
        let config = match source {
            ClusterSource::Kubeconfig { path, context } => {
                kubeconfig_config(path, context.clone()).await?
            }
            ClusterSource::InCluster => kube::Config::incluster().map_err(config_error)?,
            ClusterSource::Auto => {
                let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
                let k3s = PathBuf::from(K3S_KUBECONFIG);
                if std::env::var_os("KUBECONFIG").is_some() {
                    kube::Config::infer().await.map_err(config_error)?
                } else if in_cluster {
                    kube::Config::incluster().map_err(config_error)?
                } else if k3s.exists() {
                    kubeconfig_config(&k3s, None).await?
                } else {
                    kube::Config::infer().await.map_err(|error| {
                        TargetError::Other(format!(
                            "no cluster found ({error}): set cluster.kubeconfig, run the agent in a pod, \
                             install k3s ({K3S_KUBECONFIG}), or set cluster.target = \"none\" to only cache snapshots"
                        ))
                    })?
                }
            }
        };
        KubernetesTarget::from_config(config)
    }

    /// A target for an explicit kube-rs configuration.
    pub fn from_config(mut config: kube::Config) -> Result<KubernetesTarget, TargetError> {
        config.connect_timeout = Some(Duration::from_secs(10));
        config.read_timeout = Some(Duration::from_secs(60));
        let default_namespace = config.default_namespace.clone();
        let client = kube::Client::try_from(config).map_err(config_error)?;
        Ok(KubernetesTarget {
            client,
            default_namespace,
            discovery: RwLock::new(None),
        })
    }

    /// The resource and capabilities for `api_version`/`kind`, running discovery if needed.
    async fn resource(
        &self,
        api_version: &str,
        kind: &str,
    ) -> Result<(ApiResource, ApiCapabilities), TargetError> {
        let (group, version) = super::group_version(api_version);
        let gvk = GroupVersionKind::gvk(group, version, kind);
        if let Some(found) = self
            .discovery
            .read()
            .await
            .as_ref()
            .and_then(|discovery| discovery.resolve_gvk(&gvk))
        {
            return Ok(found);
        }
        let mut cached = self.discovery.write().await;
        if cached.is_none() {
            let discovery = kube::Discovery::new(self.client.clone())
                .run()
                .await
                .map_err(map_error)?;
            *cached = Some(discovery);
        }
        cached
            .as_ref()
            .and_then(|discovery| discovery.resolve_gvk(&gvk))
            .ok_or_else(|| TargetError::UnknownKind(format!("{api_version} {kind}")))
    }

    fn url(resource: &ApiResource, namespace: Option<&str>) -> String {
        let prefix = if resource.group.is_empty() {
            format!("/api/{}", resource.version)
        } else {
            format!("/apis/{}/{}", resource.group, resource.version)
        };
        match namespace {
            Some(namespace) => format!("{prefix}/namespaces/{namespace}/{}", resource.plural),
            None => format!("{prefix}/{}", resource.plural),
        }
    }

    /// The request builder for one object's collection.
    async fn request_for(
        &self,
        object: &ObjectRef,
    ) -> Result<(kube::core::Request, ObjectRef), TargetError> {
        let (resource, capabilities) = self.resource(&object.api_version, &object.kind).await?;
        let mut resolved = object.clone();
        let namespace = match capabilities.scope {
            Scope::Namespaced => {
                if resolved.namespace.is_empty() {
                    resolved.namespace = self.default_namespace.clone();
                }
                Some(resolved.namespace.as_str())
            }
            Scope::Cluster => {
                resolved.namespace.clear();
                None
            }
        };
        let request = kube::core::Request::new(Self::url(&resource, namespace));
        Ok((request, resolved))
    }
}

async fn kubeconfig_config(
    path: &PathBuf,
    context: Option<String>,
) -> Result<kube::Config, TargetError> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|error| {
        TargetError::Other(format!(
            "reading the kubeconfig {}: {error}",
            path.display()
        ))
    })?;
    let options = kube::config::KubeConfigOptions {
        context,
        ..Default::default()
    };
    kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|error| TargetError::Other(format!("kubeconfig {}: {error}", path.display())))
}

/// kube-rs errors in the agent's terms.
fn map_error(error: kube::Error) -> TargetError {
    match error {
        kube::Error::Api(status) => {
            let message = if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            };
            match status.code {
                409 => TargetError::Conflict(message),
                404 => TargetError::NotFound(message),
                400 | 422 => TargetError::Invalid(message),
                401 | 403 => TargetError::Forbidden(message),
                429 | 500..=599 => TargetError::Unreachable(format!("{} {message}", status.code)),
                code => TargetError::Other(format!("{code} {message}")),
            }
        }
        kube::Error::SerdeError(error) => {
            TargetError::Other(format!("unreadable answer from the API: {error}"))
        }
        other => TargetError::Unreachable(other.to_string()),
    }
}

impl KubernetesTarget {
    /// Sends a request; a 404 is `None`.
    async fn send(
        &self,
        request: Result<http::Request<Vec<u8>>, kube::core::request::Error>,
    ) -> Result<Option<Value>, TargetError> {
        let request = request.map_err(build_error)?;
        match self
            .client
            .request::<Value>(request)
            .await
            .map_err(map_error)
        {
            Ok(value) => Ok(Some(value)),
            Err(TargetError::NotFound(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }
}

fn build_error(error: kube::core::request::Error) -> TargetError {
    TargetError::Other(format!("building the request: {error}"))
}

impl ClusterTarget for KubernetesTarget {
    async fn resolve(&self, object: &Value) -> Result<ObjectRef, TargetError> {
        let reference = ObjectRef::of(object).ok_or_else(|| {
            TargetError::Invalid("object without apiVersion, kind or name".to_owned())
        })?;
        Ok(self.request_for(&reference).await?.1)
    }

    async fn apply(
        &self,
        object: &Value,
        field_manager: &str,
        force: bool,
        dry_run: bool,
    ) -> Result<Value, TargetError> {
        let reference = ObjectRef::of(object).ok_or_else(|| {
            TargetError::Invalid("object without apiVersion, kind or name".to_owned())
        })?;
        let (request, resolved) = self.request_for(&reference).await?;
        let mut params = PatchParams::apply(field_manager);
        params.force = force;
        params.dry_run = dry_run;
        let mut object = object.clone();
        if !resolved.namespace.is_empty() {
            object["metadata"]["namespace"] = Value::String(resolved.namespace.clone());
        }
        self.send(request.patch(&resolved.name, &params, &Patch::Apply(&object)))
            .await?
            .ok_or_else(|| {
                TargetError::NotFound(format!("{resolved}: the API answered 404 to an apply"))
            })
    }

    async fn get(&self, object: &ObjectRef) -> Result<Option<Value>, TargetError> {
        let (request, resolved) = self.request_for(object).await?;
        self.send(request.get(&resolved.name, &GetParams::default()))
            .await
    }

    async fn list(
        &self,
        api_version: &str,
        kind: &str,
        selector: &str,
    ) -> Result<Vec<Value>, TargetError> {
        let (resource, _) = self.resource(api_version, kind).await?;
        let request = kube::core::Request::new(Self::url(&resource, None))
            .list(&ListParams::default().labels(selector))
            .map_err(build_error)?;
        let list: Value = self.client.request(request).await.map_err(map_error)?;
        let items = match list {
            Value::Object(mut map) => match map.remove("items") {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        Ok(items
            .into_iter()
            .map(|mut item| {
                item["apiVersion"] = Value::String(api_version.to_owned());
                item["kind"] = Value::String(kind.to_owned());
                item
            })
            .collect())
    }

    async fn delete(&self, object: &ObjectRef, read: &Value) -> Result<bool, TargetError> {
        let (request, resolved) = self.request_for(object).await?;
        let text = |field: &str| read["metadata"][field].as_str().map(str::to_owned);
        let params = DeleteParams {
            preconditions: Some(kube::core::params::Preconditions {
                uid: text("uid"),
                resource_version: text("resourceVersion"),
            }),
            ..DeleteParams::background()
        };
        Ok(self
            .send(request.delete(&resolved.name, &params))
            .await?
            .is_some())
    }

    async fn refresh(&self) -> Result<(), TargetError> {
        *self.discovery.write().await = None;
        Ok(())
    }
}
