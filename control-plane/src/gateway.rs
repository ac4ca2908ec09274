//! `AgentGateway`: the agent side of the control plane. One task per session.

use std::pin::Pin;

use flotilla::{
    proto::{
        AgentMessage, ControlMessage, EnrollRequest, EnrollResponse, Goodbye, Hello, TrustBundle,
        Welcome, agent_gateway_server::AgentGateway, agent_message, control_message,
        goodbye::Reason,
    },
    protocol,
};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    sessions::{Beat, Outbound},
    state::State,
    store::{self, Claim, DropletStatus},
    tls::AgentPeer,
};

/// Messages queued to one agent before the session applies back-pressure.
const OUTBOUND_QUEUE: usize = 64;

pub struct Gateway {
    state: State,
}

impl Gateway {
    pub fn new(state: State) -> Self {
        Self { state }
    }
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentGateway for Gateway {
    async fn enroll(&self, _: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        Err(Status::unimplemented(
            "enrollment with a token is not available on this control plane yet; \
             issue a certificate with `flotilla-control-plane ca issue-agent`",
        ))
    }

    type ConnectStream = ControlStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        // Set by the TLS acceptor from the client certificate; never from the request body.
        let peer = request
            .extensions()
            .get::<AgentPeer>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("a droplet client certificate is required"))?;
        let (outbound, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let session_id = Uuid::new_v4();
        let span = tracing::info_span!("session", droplet_id = %peer.droplet_id, %session_id);
        let session = Session {
            state: self.state.clone(),
            peer,
            session_id,
            outbound,
        };
        tokio::spawn(session.run(request.into_inner()).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    state: State,
    peer: AgentPeer,
    session_id: Uuid,
    outbound: Outbound,
}

fn goodbye(reason: Reason, message: impl Into<String>) -> Goodbye {
    Goodbye {
        reason: reason as i32,
        message: message.into(),
        ..Default::default()
    }
}

impl Session {
    async fn run(self, mut inbound: Streaming<AgentMessage>) {
        let Some(hello) = self.await_hello(&mut inbound).await else {
            return;
        };
        let droplet = self.peer.droplet_id;

        match store::claim_droplet(&self.state.db, droplet, self.session_id, &hello).await {
            Ok(Claim::Held) => {}
            Ok(Claim::Deleting) => {
                self.say_goodbye(goodbye(Reason::Revoked, "this droplet is being deleted"))
                    .await;
                return;
            }
            Err(error) => {
                tracing::error!(%error, "could not record the session");
                let _ = self
                    .outbound
                    .send(Err(Status::unavailable(
                        "the control plane's database is unavailable",
                    )))
                    .await;
                return;
            }
        }

        let end = CancellationToken::new();
        if let Some(old) = self.state.sessions.register(
            droplet,
            self.session_id,
            self.outbound.clone(),
            end.clone(),
        ) {
            tracing::info!(old_session = %old.session_id, "a new session displaced the old one");
            old.close(goodbye(
                Reason::Superseded,
                "a newer session for this droplet took over",
            ));
        }
        tracing::info!(
            remote = %self.peer.remote_addr,
            agent_version = %hello.agent_version,
            hostname = hello.host.as_ref().map(|h| h.hostname.as_str()).unwrap_or(""),
            "droplet online"
        );

        if self
            .send(control_message::Kind::Welcome(self.welcome()))
            .await
        {
            self.serve(&mut inbound, &end).await;
        }

        if let Some(pending) = self.state.sessions.remove(droplet, self.session_id) {
            if let Some(seen) = pending
                && let Err(error) = store::flush_heartbeats(&self.state.db, &[seen]).await
            {
                tracing::warn!(%error, "could not write the last heartbeat");
            }
            if let Err(error) =
                store::release_droplet(&self.state.db, droplet, self.session_id).await
            {
                tracing::error!(%error, "could not record the end of the session");
            }
        }
        tracing::info!("session closed");
    }

    /// The first message must be a `Hello` in a protocol we speak.
    async fn await_hello(&self, inbound: &mut Streaming<AgentMessage>) -> Option<Hello> {
        let first = tokio::time::timeout(self.state.timing.hello_timeout, inbound.message()).await;
        let hello = match first {
            Ok(Ok(Some(AgentMessage {
                kind: Some(agent_message::Kind::Hello(hello)),
                ..
            }))) => hello,
            Ok(Ok(Some(_))) => {
                self.say_goodbye(goodbye(
                    Reason::ProtocolError,
                    "the first message of a session must be Hello",
                ))
                .await;
                return None;
            }
            Ok(Ok(None)) => return None,
            Ok(Err(status)) => {
                tracing::debug!(%status, "session ended before Hello");
                return None;
            }
            Err(_) => {
                self.say_goodbye(goodbye(Reason::ProtocolError, "no Hello in time"))
                    .await;
                return None;
            }
        };
        let theirs = hello.protocol.unwrap_or_default();
        if !protocol::compatible(&protocol::CURRENT, &theirs) {
            tracing::warn!(agent_protocol = %theirs, "refused an agent speaking an incompatible protocol");
            let mut bye = goodbye(
                Reason::IncompatibleProtocol,
                format!(
                    "this agent speaks protocol {theirs}; this control plane speaks {} and accepts one minor \
                     version either side: run an agent that speaks protocol {}",
                    protocol::CURRENT,
                    protocol::CURRENT
                ),
            );
            bye.required_protocol = Some(protocol::CURRENT);
            self.say_goodbye(bye).await;
            return None;
        }
        Some(hello)
    }

    fn welcome(&self) -> Welcome {
        Welcome {
            protocol: Some(protocol::CURRENT),
            droplet_id: self.peer.droplet_id.to_string(),
            heartbeat_interval: prost_types::Duration::try_from(
                self.state.timing.heartbeat_interval,
            )
            .ok(),
            server_time: Some(std::time::SystemTime::now().into()),
            trust_bundle: Some(TrustBundle {
                ca_certificates_pem: self.state.trust_bundle.to_vec(),
            }),
            session_id: self.session_id.to_string(),
        }
    }

    async fn serve(&self, inbound: &mut Streaming<AgentMessage>, end: &CancellationToken) {
        loop {
            let message = tokio::select! {
                () = end.cancelled() => return,
                message = inbound.message() => message,
            };
            match message {
                Ok(Some(message)) => self.handle(message).await,
                Ok(None) => {
                    tracing::info!("the agent closed the session");
                    return;
                }
                Err(status) => {
                    tracing::info!(%status, "the session's stream broke");
                    return;
                }
            }
        }
    }

    async fn handle(&self, message: AgentMessage) {
        let droplet = self.peer.droplet_id;
        match message.kind {
            Some(agent_message::Kind::Heartbeat(heartbeat)) => {
                let load = heartbeat.load.unwrap_or_default();
                if self
                    .state
                    .sessions
                    .heartbeat(droplet, self.session_id, load)
                    == Beat::Recovered
                {
                    match store::set_liveness(
                        &self.state.db,
                        droplet,
                        self.session_id,
                        DropletStatus::Online,
                    )
                    .await
                    {
                        Ok(_) => tracing::info!("droplet reachable again"),
                        Err(error) => {
                            tracing::error!(%error, "could not record that the droplet is back")
                        }
                    }
                }
            }
            Some(agent_message::Kind::Hello(_)) => {
                tracing::warn!("ignored a second Hello in one session");
            }
            Some(other) => {
                tracing::debug!(kind = ?std::mem::discriminant(&other), "ignored a message this control plane does not handle yet");
            }
            None => tracing::debug!("ignored an empty message"),
        }
    }

    async fn send(&self, kind: control_message::Kind) -> bool {
        self.outbound
            .send(Ok(ControlMessage { kind: Some(kind) }))
            .await
            .is_ok()
    }

    async fn say_goodbye(&self, goodbye: Goodbye) {
        tracing::info!(reason = ?goodbye.reason(), message = %goodbye.message, "goodbye");
        self.send(control_message::Kind::Goodbye(goodbye)).await;
    }
}
