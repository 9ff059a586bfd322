//! Who may have which certificate: the caller is authenticated with a Kubernetes
//! TokenReview of the service-account token it presents; then
//!
//! - a node agent (a trusted service account, `warren-system/warren-agent`) may have the
//!   identity of any pod scheduled on *its* node — an agent on n1 asking for a pod that
//!   runs only on n2 is refused (Istio's node authorization for ztunnel);
//! - any other caller may have only its own identity.
//!
//! A token counts only if the TokenReview says it is for this CA's audience: both
//! `authenticated` and `status.audiences` are checked, as Kubernetes asks of callers
//! that set `spec.audiences`. Successful reviews may be remembered briefly
//! ([`TokenCache`]); the authorization below is decided at every call.
//!
//! The caller's node comes from the token (bound tokens carry
//! `authentication.kubernetes.io/node-name`), else from its pod.
use std::collections::HashSet;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};

use super::{
    grpc::{Code, Status},
    token_cache::TokenCache,
};
use crate::identity::Identity;

/// The `extra` keys of a bound service-account token's user info.
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";

/// An authenticated caller: the service account its token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The node of the pod the token was issued to, when the token says.
    pub node: Option<String>,
    pub pod: Option<String>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

pub struct Authorizer {
    client: Client,
    /// The audiences a token must be for (`warren-ca`).
    audiences: Vec<String>,
    /// `namespace/service-account` of the node agents.
    trusted_agents: HashSet<String>,
    trust_domain: String,
    /// Successful reviews, remembered briefly (none when not set).
    token_cache: Option<TokenCache>,
}

impl Authorizer {
    pub fn new(
        client: Client,
        audiences: Vec<String>,
        trusted_agents: impl IntoIterator<Item = String>,
        trust_domain: String,
    ) -> Self {
        Self {
            client,
            audiences,
            trusted_agents: trusted_agents.into_iter().collect(),
            trust_domain,
            token_cache: None,
        }
    }

    /// Remember successful reviews in `cache` ([`TokenCache`]).
    pub fn with_token_cache(mut self, cache: TokenCache) -> Self {
        self.token_cache = Some(cache);
        self
    }

    /// Whether no review is remembered (or none can be).
    pub fn token_cache_is_empty(&self) -> bool {
        self.token_cache.as_ref().is_none_or(TokenCache::is_empty)
    }

    /// Whose token this is: the API server's answer, or its recent answer when cached.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, Status> {
        match &self.token_cache {
            Some(cache) => cache.get_or_review(token, || self.review(token)).await,
            None => self.review(token).await,
        }
    }

    /// Ask the API server whose token this is (a TokenReview).
    async fn review(&self, token: &str) -> Result<Caller, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|err| {
                Status::new(
                    Code::Unavailable,
                    format!("cannot review the caller's token with the API server: {err}"),
                )
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Status::new(
                Code::Unauthenticated,
                format!(
                    "the token was refused by the API server's TokenReview: {}",
                    status
                        .error
                        .unwrap_or_else(|| "not authenticated".to_owned())
                ),
            ));
        }
        // An API server that ignores `spec.audiences` (or predates them) says
        // authenticated for a token of any audience — the API server's own, another
        // service's. The audiences it answers tell: one of ours must be among them
        // (none means "valid for the API server").
        let answered = status.audiences.unwrap_or_default();
        if !answered.iter().any(|a| self.audiences.contains(a)) {
            return Err(Status::new(
                Code::Unauthenticated,
                format!(
                    "the API server authenticated the token but not for this CA: its TokenReview answered audiences [{}], none of which is [{}] (the audience the token must be minted for; an API server that ignores spec.audiences cannot be used)",
                    answered.join(", "),
                    self.audiences.join(", ")
                ),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return Err(Status::new(
                Code::Unauthenticated,
                format!("{username:?} is not a service account; only pods' service-account tokens are accepted"),
            ));
        };
        let extra = |key: &str| {
            user.extra
                .as_ref()
                .and_then(|extra| extra.get(key))
                .and_then(|values| values.first())
                .cloned()
        };
        Ok(Caller {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            node: extra(NODE_NAME),
            pod: extra(POD_NAME),
        })
    }

    /// Whether `caller` may have a certificate for `requested`.
    pub async fn authorize(&self, caller: &Caller, requested: &Identity) -> Result<(), Status> {
        if requested.trust_domain() != self.trust_domain {
            return Err(Status::new(
                Code::PermissionDenied,
                format!(
                    "{requested} is not of this CA's trust domain {}",
                    self.trust_domain
                ),
            ));
        }
        if requested.namespace() == caller.namespace
            && requested.service_account() == caller.service_account
        {
            return Ok(());
        }
        if !self.trusted_agents.contains(&caller.to_string()) {
            return Err(Status::new(
                Code::PermissionDenied,
                format!("{caller} may have only its own identity, not {requested}; node agents are trusted with --trusted-agent"),
            ));
        }
        let node = self.node_of(caller).await?;
        let pods = Api::<Pod>::namespaced(self.client.clone(), requested.namespace())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|err| {
                Status::new(
                    Code::Unavailable,
                    format!("cannot list the pods of node {node}: {err}"),
                )
            })?;
        let scheduled = pods.items.iter().any(|pod| {
            let service_account = pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|sa| !sa.is_empty())
                .unwrap_or("default");
            let finished = matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            service_account == requested.service_account() && !finished
        });
        if scheduled {
            Ok(())
        } else {
            Err(Status::new(
                Code::PermissionDenied,
                format!("node agent {caller} on node {node} asked for {requested}, but no pod of that identity is scheduled on {node}"),
            ))
        }
    }

    async fn node_of(&self, caller: &Caller) -> Result<String, Status> {
        if let Some(node) = &caller.node {
            return Ok(node.clone());
        }
        let Some(pod) = &caller.pod else {
            return Err(Status::new(
                Code::PermissionDenied,
                format!("the token of node agent {caller} names no pod or node: give the agent a projected (bound) service-account token"),
            ));
        };
        let found = Api::<Pod>::namespaced(self.client.clone(), &caller.namespace)
            .get_opt(pod)
            .await
            .map_err(|err| {
                Status::new(
                    Code::Unavailable,
                    format!("cannot read pod {}/{pod}: {err}", caller.namespace),
                )
            })?;
        found.and_then(|pod| pod.spec?.node_name).ok_or_else(|| {
            Status::new(
                Code::PermissionDenied,
                format!("node agent {caller}'s pod {pod} is not scheduled on a node"),
            )
        })
    }
}
