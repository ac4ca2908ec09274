//! `AgentGateway`: the agent side of the control plane. One task per session.

use std::pin::Pin;

use flotilla::{
    proto::{
        AgentMessage, CancelLogs, Certificate, Command, ControlMessage, EnrollRequest, EnrollResponse, Goodbye, Hello,
        Welcome, agent_gateway_server::AgentGateway, agent_message, command, control_message, goodbye::Reason,
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
    fleet::{commands::Answer, deployments, reconcile},
    identity::enrollment::{self, EnrollError},
    identity::pki::CsrError,
    session::Agents,
    session::accept::AgentPeer,
    session::delivery,
    session::registry::{self, Beat, Outbound},
    session::requests::AfterChunk,
    store::{self, Claim, DropletStatus},
};

/// Messages queued to one agent before the session applies back-pressure.
const OUTBOUND_QUEUE: usize = 64;

pub struct Gateway {
    agents: Agents,
}

impl Gateway {
    pub fn new(agents: Agents) -> Self {
        Self { agents }
    }
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentGateway for Gateway {
    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let remote = request.remote_addr();
        let request = request.into_inner();
        let agents = &self.agents;
        let outcome = enrollment::enroll(
            agents.db(),
            &agents.authorities.active,
            &request.token,
            &request.csr_pem,
            agents.cert_validity,
        )
        .await;
        match outcome {
            Ok((droplet, issued)) => {
                crate::metrics::get().enrollment("ok");
                tracing::info!(droplet_id = %droplet, serial = %issued.serial, ?remote, "droplet enrolled");
                Ok(Response::new(EnrollResponse {
                    droplet_id: droplet.to_string(),
                    certificate_chain_pem: issued.cert_pem,
                    trust_bundle: Some(agents.trust_bundle()),
                    not_after: Some(std::time::SystemTime::from(issued.not_after).into()),
                }))
            }
            Err(error) => {
                // The error never contains the token or the CSR.
                crate::metrics::get().enrollment("refused");
                tracing::warn!(?remote, %error, "refused an enrollment");
                Err(enroll_status(error))
            }
        }
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
        let session = Session { agents: self.agents.clone(), peer, session_id, outbound };
        tokio::spawn(session.run(request.into_inner()).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn enroll_status(error: EnrollError) -> Status {
    match error {
        EnrollError::Malformed(_) | EnrollError::Csr(CsrError::Invalid(_)) => {
            Status::invalid_argument(error.to_string())
        }
        EnrollError::Unknown => Status::unauthenticated(error.to_string()),
        EnrollError::Used(_) | EnrollError::Expired(..) | EnrollError::Revoked(_) => {
            Status::permission_denied(error.to_string())
        }
        EnrollError::Csr(CsrError::Signing(_)) => {
            tracing::error!(%error, "signing failed");
            Status::internal("the control plane could not sign the request")
        }
        EnrollError::Database(error) => {
            tracing::error!(%error, "database error during enrollment");
            Status::unavailable("the control plane's database is unavailable; try again")
        }
    }
}

struct Session {
    agents: Agents,
    peer: AgentPeer,
    session_id: Uuid,
    outbound: Outbound,
}

fn goodbye(reason: Reason, message: impl Into<String>) -> Goodbye {
    Goodbye { reason: reason as i32, message: message.into(), ..Default::default() }
}

impl Session {
    async fn run(self, mut inbound: Streaming<AgentMessage>) {
        let Some(hello) = self.await_hello(&mut inbound).await else {
            return;
        };
        let droplet = self.peer.droplet_id;

        let claimed = store::claim_droplet(
            self.agents.db(),
            droplet,
            self.session_id,
            self.agents.replica,
            &self.peer.serial,
            &registry::stored_facts(&hello),
        )
        .await;
        let epoch = match claimed {
            Ok(Claim::Held(epoch)) => {
                // A session of this droplet on another replica is closed by that replica.
                if let Err(error) = store::announce_session(self.agents.db(), droplet, self.session_id, epoch).await {
                    tracing::warn!(%error, "could not announce the session to the other replicas");
                }
                epoch
            }
            Ok(Claim::RateLimited(wait)) => {
                let mut bye = goodbye(
                    Reason::RateLimited,
                    format!(
                        "more than {} new sessions in {} s for this droplet",
                        store::SESSIONS_PER_WINDOW,
                        store::SESSION_WINDOW.as_secs()
                    ),
                );
                bye.reconnect_after = prost_types::Duration::try_from(wait).ok();
                tracing::warn!(?wait, "refused a session: too many new sessions lately");
                self.say_goodbye(bye).await;
                return;
            }
            Ok(Claim::Revoked) => {
                self.say_goodbye(goodbye(Reason::Revoked, "this droplet's certificate was revoked")).await;
                return;
            }
            Ok(Claim::Deleting) => {
                self.say_goodbye(goodbye(Reason::Revoked, "this droplet is being deleted")).await;
                return;
            }
            Err(error) => {
                tracing::error!(%error, "could not record the session");
                let _ =
                    self.outbound.send(Err(Status::unavailable("the control plane's database is unavailable"))).await;
                return;
            }
        };

        let end = CancellationToken::new();
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let registered = self.agents.sessions.register(
            droplet,
            self.session_id,
            epoch,
            self.peer.serial.clone(),
            self.outbound.clone(),
            end.clone(),
            wake.clone(),
        );
        match registered {
            Ok(Some(old)) => {
                tracing::info!(old_session = %old.session_id, "a new session displaced the old one");
                old.close(goodbye(Reason::Superseded, "a newer session for this droplet took over"));
            }
            Ok(None) => {}
            // This session's claim was overtaken before it got here.
            Err(registry::Stale) => {
                self.say_goodbye(goodbye(Reason::Superseded, "a newer session for this droplet took over")).await;
                return;
            }
        }
        // A revocation that arrived between the handshake and the registration found no
        // session to close; the cache has it by now.
        if self.agents.revocations.is_revoked(&self.peer.serial) {
            let message = "this droplet's certificate was revoked";
            self.agents.sessions.close_if_serial(droplet, &self.peer.serial, Reason::Revoked, message);
        }
        tracing::info!(
            remote = %self.peer.remote_addr,
            agent_version = %hello.agent_version,
            hostname = hello.host.as_ref().map(|h| h.hostname.as_str()).unwrap_or(""),
            "droplet online"
        );

        if self.send(control_message::Kind::Welcome(self.welcome())).await {
            for container in &hello.inventory {
                deployments::observe(&self.agents.fleet, droplet, container).await;
            }
            if let Err(error) = reconcile::droplet(&self.agents.fleet, droplet, Some(&hello.inventory)).await {
                tracing::warn!(%error, "could not reconcile the droplet's inventory");
            }
            // Every unanswered command goes out again, in order; then new ones as they come.
            let delivery = tokio::spawn(
                delivery::deliver(
                    self.agents.fleet.clone(),
                    droplet,
                    self.session_id,
                    self.outbound.clone(),
                    wake,
                    end.child_token(),
                )
                .in_current_span(),
            );
            let recorder = delivery::Recorder::start(self.agents.db().clone(), self.agents.sessions.clone(), droplet);
            self.serve(&mut inbound, &end, &recorder).await;
            delivery.abort();
            recorder.finish().await;
        }

        if let Some(pending) = self.agents.sessions.remove(droplet, self.session_id) {
            if let Some(seen) = pending
                && let Err(error) = store::flush_heartbeats(self.agents.db(), &[seen]).await
            {
                tracing::warn!(%error, "could not write the last heartbeat");
            }
            if let Err(error) = store::release_droplet(self.agents.db(), droplet, self.session_id).await {
                tracing::error!(%error, "could not record the end of the session");
            }
        }
        tracing::info!("session closed");
    }

    /// The first message must be a `Hello` in a protocol we speak.
    async fn await_hello(&self, inbound: &mut Streaming<AgentMessage>) -> Option<Hello> {
        let first = tokio::time::timeout(self.agents.timing.hello_timeout, inbound.message()).await;
        let hello = match first {
            Ok(Ok(Some(AgentMessage { kind: Some(agent_message::Kind::Hello(hello)), .. }))) => hello,
            Ok(Ok(Some(_))) => {
                self.say_goodbye(goodbye(Reason::ProtocolError, "the first message of a session must be Hello")).await;
                return None;
            }
            Ok(Ok(None)) => return None,
            Ok(Err(status)) => {
                tracing::debug!(%status, "session ended before Hello");
                return None;
            }
            Err(_) => {
                self.say_goodbye(goodbye(Reason::ProtocolError, "no Hello in time")).await;
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
            heartbeat_interval: prost_types::Duration::try_from(self.agents.timing.heartbeat_interval).ok(),
            server_time: Some(std::time::SystemTime::now().into()),
            trust_bundle: Some(self.agents.trust_bundle()),
            session_id: self.session_id.to_string(),
        }
    }

    async fn serve(
        &self,
        inbound: &mut Streaming<AgentMessage>,
        end: &CancellationToken,
        recorder: &delivery::Recorder,
    ) {
        loop {
            let message = tokio::select! {
                () = end.cancelled() => return,
                message = inbound.message() => message,
            };
            match message {
                Ok(Some(message)) => self.handle(message, recorder).await,
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

    async fn handle(&self, message: AgentMessage, recorder: &delivery::Recorder) {
        let droplet = self.peer.droplet_id;
        match message.kind {
            Some(agent_message::Kind::Heartbeat(heartbeat)) => {
                let load = heartbeat.load.unwrap_or_default();
                if self.agents.sessions.heartbeat(droplet, self.session_id, load) == Beat::Recovered {
                    match store::set_liveness(self.agents.db(), droplet, self.session_id, DropletStatus::Online).await {
                        Ok(_) => tracing::info!("droplet reachable again"),
                        Err(error) => {
                            tracing::error!(%error, "could not record that the droplet is back")
                        }
                    }
                }
            }
            Some(agent_message::Kind::RenewCertificate(renew)) => self.renew(&renew.csr_pem).await,
            Some(agent_message::Kind::CommandAck(ack)) => {
                if let Ok(id) = uuid::Uuid::try_parse(&ack.command_id) {
                    recorder.answer(Answer::Acked(id, chrono::Utc::now())).await;
                }
            }
            Some(agent_message::Kind::CommandResult(result)) => {
                if let Some(container) = &result.container {
                    deployments::observe(&self.agents.fleet, droplet, container).await;
                }
                if !result.success {
                    tracing::warn!(command_id = %result.command_id, "command failed: {}", result.message);
                    let named = match &result.container {
                        _ if !result.deployment_id.is_empty() => result.deployment_id.as_str(),
                        Some(container) => container.deployment_id.as_str(),
                        None => "",
                    };
                    if let Ok(deployment) = uuid::Uuid::try_parse(named)
                        && let Err(error) = store::set_deployment_error(
                            self.agents.db(),
                            deployment,
                            droplet.as_uuid(),
                            &result.message,
                        )
                        .await
                    {
                        tracing::warn!(%error, "could not record a command's failure");
                    }
                }
                recorder.answer(Answer::Finished(Box::new(result), chrono::Utc::now())).await;
            }
            Some(agent_message::Kind::ContainerEvent(event)) => {
                deployments::event(&self.agents.fleet, droplet, &event).await
            }
            Some(agent_message::Kind::RequestReply(reply)) => {
                self.agents.sessions.reply(droplet, self.session_id, reply);
            }
            Some(agent_message::Kind::LogChunk(chunk)) => {
                let request_id = chunk.request_id.clone();
                if self.agents.sessions.log_chunk(droplet, self.session_id, chunk) == AfterChunk::CallerGone {
                    // Nobody reads this stream any more: the agent stops reading Docker.
                    let cancel = Command {
                        id: uuid::Uuid::new_v4().to_string(),
                        deadline: None,
                        kind: Some(command::Kind::CancelLogs(CancelLogs { request_id })),
                    };
                    self.agents.sessions.send(droplet, control_message::Kind::Command(cancel));
                }
            }
            Some(agent_message::Kind::Hello(_)) => {
                tracing::warn!("ignored a second Hello in one session");
            }
            None => tracing::debug!("ignored an empty message"),
        }
    }

    /// Signs a fresh CSR for the droplet this session's certificate names, and nothing else.
    async fn renew(&self, csr_pem: &str) {
        let droplet = self.peer.droplet_id;
        let agents = &self.agents;
        let ca = &agents.authorities.active;
        let issued = match enrollment::sign_for(ca, csr_pem, droplet, agents.cert_validity) {
            Ok(issued) => issued,
            Err(error) => {
                tracing::warn!(%error, "refused a certificate renewal");
                return;
            }
        };
        let recorded = async {
            let mut conn = agents.db().acquire().await?;
            enrollment::record(&mut conn, ca, droplet, &issued, "renewal").await
        }
        .await;
        if let Err(error) = recorded {
            tracing::error!(%error, "could not record a renewed certificate; not handing it out");
            return;
        }
        tracing::info!(serial = %issued.serial, not_after = %issued.not_after, "renewed the droplet's certificate");
        let certificate = Certificate {
            certificate_chain_pem: issued.cert_pem,
            trust_bundle: Some(agents.trust_bundle()),
            not_after: Some(std::time::SystemTime::from(issued.not_after).into()),
        };
        self.send(control_message::Kind::Certificate(certificate)).await;
    }

    async fn send(&self, kind: control_message::Kind) -> bool {
        self.outbound.send(Ok(ControlMessage { kind: Some(kind) })).await.is_ok()
    }

    async fn say_goodbye(&self, goodbye: Goodbye) {
        tracing::info!(reason = ?goodbye.reason(), message = %goodbye.message, "goodbye");
        self.send(control_message::Kind::Goodbye(goodbye)).await;
    }
}
