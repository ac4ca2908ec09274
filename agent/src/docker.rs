//! The connection to the local Docker engine (bollard): made lazily, an API version agreed
//! with the engine, and this droplet's container count for heartbeats.

use std::{collections::HashMap, time::Duration};

use bollard::{API_DEFAULT_VERSION, Docker, query_parameters::ListContainersOptionsBuilder};
use flotilla::DropletId;

use crate::labels;

/// A handle on the engine, or why there is none.
#[derive(Clone)]
pub struct Engine {
    docker: Result<Docker, String>,
    /// False once the engine failed to answer, so heartbeats do not keep knocking.
    answered: bool,
}

/// How long one call to the engine may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl Engine {
    /// Connects lazily: a missing engine is reported in `Hello`, not fatal.
    pub fn new(socket: &str) -> Self {
        let docker = Docker::connect_with_unix(socket, CALL_TIMEOUT.as_secs(), API_DEFAULT_VERSION)
            .map_err(|e| format!("cannot use the Docker socket {socket}: {e}"));
        Self { docker, answered: false }
    }

    /// The engine's version, agreeing an API version with it first (older engines refuse
    /// a newer client's version).
    pub async fn version(&mut self) -> Result<String, String> {
        self.answered = false;
        let docker = self.docker.clone()?;
        let negotiated = tokio::time::timeout(CALL_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| "the Docker engine did not answer in time".to_owned())?
            .map_err(|e| format!("the Docker engine did not answer: {e}"))?;
        let version = negotiated.version().await.map_err(|e| format!("asking the Docker engine its version: {e}"))?;
        self.docker = Ok(negotiated);
        self.answered = true;
        Ok(version.version.unwrap_or_else(|| "unknown".into()))
    }

    /// The engine, once it has answered.
    pub fn docker(&self) -> Result<Docker, String> {
        let docker = self.docker.clone()?;
        if self.answered { Ok(docker) } else { Err("the Docker engine has not answered".into()) }
    }

    /// Containers this droplet manages (running or not); 0 when the engine is unavailable.
    pub async fn managed_containers(&self, droplet: DropletId) -> u32 {
        let Ok(docker) = &self.docker else { return 0 };
        if !self.answered {
            return 0;
        }
        let filters = HashMap::from([("label", labels::managed_by(droplet))]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        match docker.list_containers(Some(options)).await {
            Ok(list) => u32::try_from(list.len()).unwrap_or(u32::MAX),
            Err(error) => {
                tracing::debug!(%error, "could not count containers");
                0
            }
        }
    }
}
