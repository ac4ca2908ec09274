//! The control plane's commands: `serve`, and the operator's commands that work on the
//! database directly (the CA, tokens, API keys, droplets, certificates). Like `server.rs`,
//! this names every floor.

use std::sync::Arc;

use crate::{
    Listeners, ServeConfig,
    api::{auth, convert},
    cli::{ApiKeyCommand, CaCommand, CertCommand, Cli, Command, DropletCommand, ServeArgs, StateArgs, TokenCommand},
    identity::enrollment,
    identity::master_key::MasterKey,
    identity::pki::{self, Authorities},
    serve, store,
};
use anyhow::Context as _;
use flotilla::DropletId;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::net::TcpListener;

fn master_key(state: &StateArgs) -> anyhow::Result<MasterKey> {
    match &state.master_key {
        Some(text) => MasterKey::parse(text).context("--master-key / FLOTILLA_MASTER_KEY"),
        None => MasterKey::load_or_create(&state.master_key_path()),
    }
}

async fn open(state: &StateArgs) -> anyhow::Result<(PgPool, MasterKey)> {
    let key = master_key(state)?;
    Ok((store::connect(&state.database_url, 4).await?, key))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => run_serve(*args).await,
        Command::Ca(command) => run_ca(command).await,
        Command::Token(command) => run_token(command).await,
        Command::ApiKey(command) => run_api_key(command).await,
        Command::Droplet(DropletCommand::Delete { state, id }) => {
            let db = store::connect(&state.database_url, 2).await?;
            match store::delete_droplet(&db, id.as_uuid()).await? {
                Some(revoked) => {
                    println!("deleted droplet {id}; revoked {} certificate(s)", revoked.len());
                    Ok(())
                }
                None => anyhow::bail!("droplet {id} not found"),
            }
        }
        Command::Cert(CertCommand::Revoke { state, target }) => {
            let db = store::connect(&state.database_url, 2).await?;
            let what = match target.parse::<DropletId>() {
                Ok(droplet) => store::Revoke::Droplet(droplet.as_uuid()),
                Err(_) if !target.is_empty() && target.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    store::Revoke::Serial(target.to_ascii_lowercase())
                }
                Err(_) => anyhow::bail!("{target:?} is neither a droplet id nor a certificate serial (hex)"),
            };
            let mut conn = db.acquire().await?;
            let revoked = store::revoke_certificates(&mut conn, &what).await?;
            if revoked.is_empty() {
                anyhow::bail!("no unrevoked certificate matches {target}");
            }
            for (serial, droplet) in revoked {
                println!("revoked {serial} (droplet {droplet})");
            }
            Ok(())
        }
    }
}

async fn run_ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { state } => {
            let (db, key) = open(&state).await?;
            let (authorities, created) = Authorities::load_or_create(&db, &key).await?;
            let verb = if created { "created" } else { "kept the existing" };
            println!("{verb} fleet CA {}\nCA sha256: {}", authorities.active.id, authorities.active.sha256_pin());
            pki::write_bundle(&state.data_dir, &authorities.bundle)?;
            Ok(())
        }
        CaCommand::List { state } => {
            let (db, _) = open(&state).await?;
            let mut conn = db.acquire().await?;
            for row in store::authorities_in_service(&mut conn).await? {
                println!("{}  {:<8}  sha256 {}  created {}", row.id, row.state, row.sha256, row.created_at);
            }
            Ok(())
        }
        CaCommand::Stage { state } => {
            let (db, key) = open(&state).await?;
            let id = Authorities::stage_next(&db, &key).await?;
            println!("staged CA {id}: restart each control plane so agents receive it, then `ca activate`");
            Ok(())
        }
        CaCommand::Activate { state } => {
            let (db, _) = open(&state).await?;
            let id = Authorities::activate_next(&db).await?;
            println!("CA {id} signs from the next start of each control plane; the old one stays trusted");
            Ok(())
        }
        CaCommand::Retire { state } => {
            let (db, _) = open(&state).await?;
            match Authorities::retire(&db).await? {
                Some(id) => println!("retired CA {id}: restart each control plane to stop trusting it"),
                None => println!("no CA was retiring"),
            }
            Ok(())
        }
        CaCommand::IssueAgent { state, droplet, out, valid_for } => {
            let (db, key) = open(&state).await?;
            let (authorities, _) = Authorities::load_or_create(&db, &key).await?;
            let ca = &authorities.active;
            let now = OffsetDateTime::now_utc();
            let issued = ca.issue_agent(droplet, now - pki::backdate_for(valid_for), now + valid_for)?;
            let mut conn = db.acquire().await?;
            enrollment::record(&mut conn, ca, droplet, &issued, "operator").await?;
            pki::write_pair(&out, "agent", &issued)?;
            pki::write_bundle(&out, &authorities.bundle)?;
            println!("wrote agent.crt, agent.key and ca.crt for droplet {droplet} to {}", out.display());
            Ok(())
        }
    }
}

async fn run_api_key(command: ApiKeyCommand) -> anyhow::Result<()> {
    match command {
        ApiKeyCommand::Create { db, account, scope, expires, name } => {
            let db = store::connect(&db.database_url, 2).await?;
            // The first key may come before the first start of a control plane.
            store::MIGRATOR.run(&db).await.context("applying database migrations")?;
            let created = auth::create(&db, &account, scope, &name, expires).await?;
            let expires = created.row.expires_at.map(|at| format!("expires {at}")).unwrap_or("never expires".into());
            eprintln!("API key {} for account {account}, scope {scope}, {expires}; it is shown once:", created.id);
            println!("{}", created.key);
            Ok(())
        }
        ApiKeyCommand::List { db, account } => {
            let db = store::connect(&db.database_url, 2).await?;
            for key in store::list_api_keys(&db, account.as_deref()).await?.into_iter().map(convert::key_to_proto) {
                let state = match (&key.revoked_at, &key.expires_at) {
                    (Some(_), _) => "revoked".to_owned(),
                    (None, Some(at)) => format!("expires {at}"),
                    (None, None) => "active".to_owned(),
                };
                let used = key.last_used_at.map(|t| format!("last used {t}")).unwrap_or("never used".into());
                println!(
                    "{}  {}…  {:<10}  {:<5}  {state}  {used}  {}",
                    key.id, key.prefix, key.account, key.scope, key.name
                );
            }
            Ok(())
        }
        ApiKeyCommand::Revoke { db, id } => {
            let db = store::connect(&db.database_url, 2).await?;
            match store::revoke_api_key(&db, id).await? {
                Some(row) => {
                    println!("revoked API key {id} ({}…, account {})", row.prefix, row.account);
                    Ok(())
                }
                None => anyhow::bail!("API key {id} not found"),
            }
        }
    }
}

async fn run_token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { state, account, droplet, ttl, name } => {
            let (db, key) = open(&state).await?;
            let (authorities, _) = Authorities::load_or_create(&db, &key).await?;
            let created = enrollment::create(&db, &authorities.active, &account, droplet, &name, ttl).await?;
            eprintln!(
                "token {} for droplet {} (expires {}); it is shown once:",
                created.row.id, created.row.droplet_id, created.row.expires_at
            );
            println!("{}", created.token);
            Ok(())
        }
        TokenCommand::List { state, account } => {
            let db = store::connect(&state.database_url, 2).await?;
            for row in store::list_tokens(&db, account.as_deref()).await? {
                let token = convert::token_to_proto(row);
                println!(
                    "{}  {:<8}  droplet {}  {:?}  expires {}",
                    token.id,
                    token.account,
                    token.droplet_id,
                    token.state(),
                    token.expires_at.map(|t| t.to_string()).unwrap_or_default()
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { state, id } => {
            let db = store::connect(&state.database_url, 2).await?;
            if store::revoke_token(&db, id).await? {
                println!("revoked token {id}");
                Ok(())
            } else {
                anyhow::bail!("no unused, unrevoked token {id}")
            }
        }
    }
}

async fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let bind = |addr, what: &'static str| async move {
        TcpListener::bind(addr).await.with_context(|| format!("binding the {what} port {addr}"))
    };
    let agent = bind(args.agent_listen, "agent").await?;
    let enroll = bind(args.enroll_listen, "enrollment").await?;
    let api = bind(args.api_listen, "API").await?;
    let key = master_key(&args.state)?;
    let db = store::connect(&args.state.database_url, args.database_connections).await?;
    let api_tls = args.api_tls();
    let providers = args.providers()?;
    let jwt = args.jwt().map_err(anyhow::Error::msg)?;
    let config = ServeConfig {
        data_dir: args.state.data_dir,
        public_names: args.public_names,
        advertise_api: args.advertise_api,
        timing: args.timing,
        master_key: Arc::new(key),
        cert_validity: args.cert_validity,
        api_rate_limit: args.api_rate_limit,
        api_tls,
        jwt,
        agent_image: args.agent_image.clone(),
        providers,
        provision_timeout: args.provision_timeout,
    };
    serve(db, config, Listeners { agent, enroll, api }, shutdown_signal()).await
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only ctrl-c stops the control plane");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
    }
}
