//! The MCP server Flotilla's tests deploy: streamable HTTP at `/mcp` with two tools
//! (`echo`, `add`), and a health endpoint the tests can switch.
//!
//! - `GET /healthz` answers 200, or 503 once `POST /healthz/fail` was called (`POST
//!   /healthz/ok` restores it);
//! - `EXIT_AFTER_MS` and `EXIT_CODE` make it exit with that code after that long (the
//!   crash-loop container);
//! - `ALLOCATE_MB` makes it allocate and touch that much memory at start (the OOM test);
//! - `LOG_EVERY_MS` makes it write a numbered line to stdout that often, and
//!   `LOG_BURST` lines at start (the log tests);
//! - `PORT` (default 8080) is where it listens, on all addresses.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    routing::{get, post},
};
use rmcp::{
    ServerHandler,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{Implementation, ServerCapabilities, ServerInfo},
    schemars, tool, tool_handler, tool_router,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct EchoRequest {
    /// The text to send back.
    text: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct AddRequest {
    a: i64,
    b: i64,
}

#[derive(Debug, Clone)]
struct TestServer {
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl TestServer {
    fn new() -> Self {
        Self { tool_router: Self::tool_router() }
    }

    #[tool(description = "Echo the text back")]
    fn echo(&self, Parameters(EchoRequest { text }): Parameters<EchoRequest>) -> String {
        text
    }

    #[tool(description = "Add two integers")]
    fn add(&self, Parameters(AddRequest { a, b }): Parameters<AddRequest>) -> String {
        a.saturating_add(b).to_string()
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for TestServer {
    fn get_info(&self) -> ServerInfo {
        ServerInfo::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("flotilla-test-mcp-server", env!("CARGO_PKG_VERSION")))
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port = env_u64("PORT").unwrap_or(8080);
    if let Some(after) = env_u64("EXIT_AFTER_MS") {
        let code = env_u64("EXIT_CODE").unwrap_or(1) as i32;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after)).await;
            eprintln!("exiting with code {code} as asked");
            std::process::exit(code);
        });
    }
    if let Some(mb) = env_u64("ALLOCATE_MB") {
        // Touch every page, so the memory is really used (and a limit really hit).
        let hog = vec![1u8; (mb as usize) << 20];
        eprintln!("allocated {} MiB", hog.iter().map(|&b| b as usize).sum::<usize>() >> 20);
        std::mem::forget(hog);
    }
    for n in 0..env_u64("LOG_BURST").unwrap_or(0) {
        println!("burst line {n:08}");
    }
    if let Some(every) = env_u64("LOG_EVERY_MS") {
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                println!("line {n:08}");
                n += 1;
                tokio::time::sleep(Duration::from_millis(every.max(1))).await;
            }
        });
    }

    // The probe reaches the server by container IP or published port: accept any Host.
    let config = StreamableHttpServerConfig::default().disable_allowed_hosts().with_sse_keep_alive(None);
    let mcp: StreamableHttpService<TestServer, LocalSessionManager> =
        StreamableHttpService::new(|| Ok(TestServer::new()), Default::default(), config);
    let healthy = Arc::new(AtomicBool::new(true));
    let app = Router::new()
        .nest_service("/mcp", mcp)
        .route("/healthz", get(health))
        .route(
            "/healthz/fail",
            post(|State(h): State<Arc<AtomicBool>>| async move { h.store(false, Ordering::SeqCst) }),
        )
        .route("/healthz/ok", post(|State(h): State<Arc<AtomicBool>>| async move { h.store(true, Ordering::SeqCst) }))
        .with_state(healthy);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port as u16)).await?;
    eprintln!("flotilla-test-mcp-server listening on {}", listener.local_addr()?);
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        match term.as_mut() {
            Some(term) => {
                term.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

async fn health(State(healthy): State<Arc<AtomicBool>>) -> StatusCode {
    if healthy.load(Ordering::SeqCst) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
}
