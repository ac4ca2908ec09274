//! Agent connections as tonic sees them: the TLS accept loop of `identity::tls`, with the
//! droplet each client certificate names attached to the connection (`Connected`), so a
//! session is attributed to its certificate and never to an id inside a message.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use flotilla::{DropletId, identity::droplet_from_certificate};
use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::identity::{pki::serial_of, tls::accept};

/// Who is on the other end of an agent connection, as its certificate says.
#[derive(Clone, Debug)]
pub struct AgentPeer {
    pub droplet_id: DropletId,
    /// The serial of the client certificate, lowercase hex.
    pub serial: String,
    pub remote_addr: SocketAddr,
}

/// An authenticated agent connection.
pub struct AgentConn {
    io: TlsStream<TcpStream>,
    peer: AgentPeer,
}

impl Connected for AgentConn {
    type ConnectInfo = AgentPeer;

    fn connect_info(&self) -> AgentPeer {
        self.peer.clone()
    }
}

impl AsyncRead for AgentConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts agent connections until `stop` is cancelled. Connections whose certificate
/// names no droplet are closed here.
pub fn accept_agents(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) -> ReceiverStream<Result<AgentConn, io::Error>> {
    accept(listener, config, stop, "agent", |io, remote_addr| {
        let leaf = io.get_ref().1.peer_certificates().and_then(|certs| certs.first()).ok_or("no client certificate")?;
        let droplet_id = droplet_from_certificate(leaf.as_ref()).map_err(|e| e.to_string())?;
        let serial = serial_of(leaf.as_ref()).ok_or("unreadable certificate serial")?;
        Ok(AgentConn { io, peer: AgentPeer { droplet_id, serial, remote_addr } })
    })
}
