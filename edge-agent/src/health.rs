//! Is a live object healthy? The rules kubectl's `rollout status` and Flux's health checks use:
//! workloads whose controller has observed the latest generation and whose updated replicas are
//! available, Jobs that completed, CRDs that are Established, and a generic `Ready` condition.

use serde_json::Value;

/// One object's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Applied and healthy (or a kind without a notion of health).
    Ready,
    /// Not there yet; why.
    Progressing(String),
    /// Will not get there without a change (deadline exceeded, job failed); why.
    Failed(String),
}

fn number(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

fn condition<'v>(object: &'v Value, kind: &str) -> Option<&'v Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|condition| condition["type"] == kind)
}

fn is_true(condition: Option<&Value>) -> bool {
    condition.is_some_and(|condition| condition["status"] == "True")
}

fn message_of(condition: Option<&Value>) -> String {
    condition
        .and_then(|condition| condition["message"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The health of `object` as the API returned it.
pub fn assess(object: &Value) -> Health {
    let group = object["apiVersion"]
        .as_str()
        .map_or("", |v| crate::target::group_version(v).0);
    let kind = object["kind"].as_str().unwrap_or_default();
    let status = &object["status"];
    let generation = number(&object["metadata"]["generation"]);
    let observed = || {
        let seen = number(&status["observedGeneration"]);
        (seen >= generation).then_some(()).ok_or_else(|| {
            Health::Progressing(format!(
                "waiting for the controller to see generation {generation} (saw {seen})"
            ))
        })
    };
    let replicas = object["spec"]["replicas"].as_u64().unwrap_or(1);
    let verdict = match (group, kind) {
        ("apps", "Deployment") => observed().and_then(|()| {
            let progressing = condition(object, "Progressing");
            if progressing.is_some_and(|c| c["reason"] == "ProgressDeadlineExceeded") {
                return Err(Health::Failed(format!(
                    "progress deadline exceeded: {}",
                    message_of(progressing)
                )));
            }
            let (updated, available, total) = (
                number(&status["updatedReplicas"]),
                number(&status["availableReplicas"]),
                number(&status["replicas"]),
            );
            if updated < replicas {
                Err(format!("{updated} of {replicas} replicas updated"))
            } else if total > updated {
                Err(format!(
                    "{} old replicas pending termination",
                    total - updated
                ))
            } else if available < updated {
                Err(format!(
                    "{available} of {updated} updated replicas available"
                ))
            } else {
                Ok(())
            }
            .map_err(Health::Progressing)
        }),
        ("apps", "StatefulSet") => observed().and_then(|()| {
            let (ready, updated) = (
                number(&status["readyReplicas"]),
                number(&status["updatedReplicas"]),
            );
            if ready < replicas {
                Err(format!("{ready} of {replicas} replicas ready"))
            } else if updated < replicas && status["currentRevision"] != status["updateRevision"] {
                Err(format!("{updated} of {replicas} replicas updated"))
            } else {
                Ok(())
            }
            .map_err(Health::Progressing)
        }),
        ("apps", "DaemonSet") => observed().and_then(|()| {
            let desired = number(&status["desiredNumberScheduled"]);
            let (updated, available) = (
                number(&status["updatedNumberScheduled"]),
                number(&status["numberAvailable"]),
            );
            if updated < desired {
                Err(format!("{updated} of {desired} pods updated"))
            } else if available < desired {
                Err(format!("{available} of {desired} pods available"))
            } else {
                Ok(())
            }
            .map_err(Health::Progressing)
        }),
        ("batch", "Job") => {
            if is_true(condition(object, "Complete")) {
                Ok(())
            } else if is_true(condition(object, "Failed")) {
                Err(Health::Failed(format!(
                    "job failed: {}",
                    message_of(condition(object, "Failed"))
                )))
            } else {
                Err(Health::Progressing("job not complete".to_owned()))
            }
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if is_true(condition(object, "Established")) {
                Ok(())
            } else {
                Err(Health::Progressing("not established yet".to_owned()))
            }
        }
        _ => match condition(object, "Ready") {
            Some(ready) if ready["status"] != "True" => Err(Health::Progressing(format!(
                "not ready: {}",
                message_of(Some(ready))
            ))),
            _ => Ok(()),
        },
    };
    match verdict {
        Ok(()) => Health::Ready,
        Err(health) => health,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(status: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"generation": 2},
               "spec": {"replicas": 2}, "status": status})
    }

    #[test]
    fn deployments_need_the_new_generation_observed_and_available() {
        assert!(
            matches!(assess(&deployment(json!({"observedGeneration": 1}))), Health::Progressing(m) if m.contains("generation 2"))
        );
        assert!(
            matches!(assess(&deployment(json!({"observedGeneration": 2, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 1}))), Health::Progressing(m) if m.contains("1 of 2"))
        );
        assert_eq!(
            assess(&deployment(
                json!({"observedGeneration": 2, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 2})
            )),
            Health::Ready
        );
        let stuck = deployment(
            json!({"observedGeneration": 2, "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "image pull"}]}),
        );
        assert!(matches!(assess(&stuck), Health::Failed(m) if m.contains("image pull")));
    }

    #[test]
    fn jobs_crds_and_ready_conditions() {
        let job = |conditions: Value| json!({"apiVersion": "batch/v1", "kind": "Job", "status": {"conditions": conditions}});
        assert_eq!(
            assess(&job(json!([{"type": "Complete", "status": "True"}]))),
            Health::Ready
        );
        assert!(matches!(
            assess(&job(
                json!([{"type": "Failed", "status": "True", "message": "backoff"}])
            )),
            Health::Failed(_)
        ));
        assert!(matches!(assess(&job(json!([]))), Health::Progressing(_)));
        let crd = json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "status": {}});
        assert!(matches!(assess(&crd), Health::Progressing(_)));
        let custom = json!({"apiVersion": "x.io/v1", "kind": "Thing", "status": {"conditions": [{"type": "Ready", "status": "False", "message": "m"}]}});
        assert!(matches!(assess(&custom), Health::Progressing(_)));
        assert_eq!(
            assess(&json!({"apiVersion": "v1", "kind": "ConfigMap"})),
            Health::Ready
        );
    }
}
