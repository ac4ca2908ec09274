//! Every HTTP route of the fleet API and the RPC it calls: what the HTTP side serves and
//! what the OpenAPI document describes.

use http::Method;

/// The largest request body the HTTP side reads.
pub const MAX_BODY: usize = 1024 * 1024;

/// How an HTTP route maps onto an RPC.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: Method,
    /// Segments in braces are fields of the request; `{id}:verb` matches `<id>:verb`.
    pub path: &'static str,
    pub rpc: &'static str,
}

const fn route(method: Method, path: &'static str, rpc: &'static str) -> Route {
    Route { method, path, rpc }
}

/// Every HTTP route. GET and DELETE take their fields from the path and query; POST and
/// PUT from the path and a JSON body.
pub const ROUTES: &[Route] = &[
    route(Method::GET, "/v1/droplets", "ListDroplets"),
    route(Method::POST, "/v1/droplets", "CreateDroplet"),
    route(Method::GET, "/v1/droplets/{id}", "GetDroplet"),
    route(Method::DELETE, "/v1/droplets/{id}", "DeleteDroplet"),
    route(Method::PUT, "/v1/droplets/{id}/labels", "UpdateDropletLabels"),
    route(Method::GET, "/v1/droplets/{droplet_id}/deployments", "ListDeployments"),
    route(Method::POST, "/v1/droplets/{droplet_id}/deployments", "CreateDeployment"),
    route(Method::GET, "/v1/enrollment-tokens", "ListEnrollmentTokens"),
    route(Method::POST, "/v1/enrollment-tokens", "CreateEnrollmentToken"),
    route(Method::POST, "/v1/enrollment-tokens/{id}:revoke", "RevokeEnrollmentToken"),
    route(Method::GET, "/v1/deployments", "ListDeployments"),
    route(Method::GET, "/v1/deployments/{id}", "GetDeployment"),
    route(Method::PUT, "/v1/deployments/{id}", "UpdateDeployment"),
    route(Method::DELETE, "/v1/deployments/{id}", "RemoveDeployment"),
    route(Method::POST, "/v1/deployments/{id}:start", "StartDeployment"),
    route(Method::POST, "/v1/deployments/{id}:stop", "StopDeployment"),
    route(Method::POST, "/v1/deployments/{id}:restart", "RestartDeployment"),
    route(Method::POST, "/v1/deployments/{id}:check-health", "CheckDeploymentHealth"),
    route(Method::GET, "/v1/deployments/{id}/container", "InspectDeployment"),
    route(Method::GET, "/v1/deployments/{deployment_id}/tools", "ListTools"),
    route(Method::GET, "/v1/deployments/{deployment_id}/logs", "TailLogs"),
    route(Method::GET, "/v1/commands", "ListCommands"),
    route(Method::GET, "/v1/commands/{id}", "GetCommand"),
    route(Method::POST, "/v1/commands/{id}:wait", "WaitCommand"),
    route(Method::GET, "/v1/events", "WatchEvents"),
    route(Method::GET, "/v1/api-keys", "ListApiKeys"),
    route(Method::POST, "/v1/api-keys", "CreateApiKey"),
    route(Method::POST, "/v1/api-keys/{id}:revoke", "RevokeApiKey"),
];
