//! A `Fleet` client from the connection flags: h2c for `http://`, TLS for `https://`
//! (the system's roots plus `--ca-cert`), and the API key on every call.

use std::time::Duration;

use flotilla::{proto::fleet_client::FleetClient, telemetry::error_chain};
use tonic::{
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use crate::{
    args::Connection,
    exit::{Exit, Failure},
};

/// Puts `authorization: Bearer <key>` on every call.
#[derive(Clone)]
pub struct Bearer(AsciiMetadataValue);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Fleet = FleetClient<InterceptedService<Channel, Bearer>>;

/// Connects to the control plane named by `connection`.
pub async fn fleet(connection: &Connection) -> anyhow::Result<Fleet> {
    let url = connection.url.as_deref().filter(|u| !u.is_empty()).ok_or_else(|| {
        Failure::usage("no control plane: set FLOTILLA_URL or pass --url (e.g. https://cp.example.com:7080)")
    })?;
    let key = connection
        .api_key
        .as_deref()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Failure::usage("no API key: set FLOTILLA_API_KEY or pass --api-key"))?;
    let bearer = AsciiMetadataValue::try_from(format!("Bearer {key}"))
        .map_err(|_| Failure::usage("the API key is not printable ASCII"))?;
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| Failure::usage(format!("{url:?} is not a URL (e.g. https://cp.example.com:7080)")))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    match endpoint.uri().scheme_str() {
        Some("http") => {}
        Some("https") => {
            let tls = tls(connection)?;
            endpoint = endpoint.tls_config(tls).map_err(|e| Failure::usage(format!("TLS: {}", error_chain(&e))))?;
        }
        _ => return Err(Failure::usage(format!("{url:?}: the URL must start with https:// or http://"))),
    }
    let channel = endpoint.connect().await.map_err(|error| {
        Failure::of(Exit::Unavailable, format!("cannot reach the control plane at {url}: {}", error_chain(&error)))
    })?;
    Ok(FleetClient::with_interceptor(channel, Bearer(bearer)))
}

fn tls(connection: &Connection) -> anyhow::Result<ClientTlsConfig> {
    let mut tls = ClientTlsConfig::new().with_native_roots();
    if let Some(path) = &connection.ca_cert {
        let pem =
            std::fs::read(path).map_err(|error| Failure::usage(format!("--ca-cert {}: {error}", path.display())))?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    Ok(tls)
}

/// Every item of a paged list: `list` is called with each page's token (first the empty
/// one) and answers the page's items and the next token, empty on the last page.
pub async fn every_page<T, Fut>(mut list: impl FnMut(String) -> Fut) -> anyhow::Result<Vec<T>>
where
    Fut: Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = list(token).await?;
        items.extend(page);
        if next.is_empty() {
            return Ok(items);
        }
        token = next;
    }
}
