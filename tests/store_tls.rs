//! TLS to the stores: a PostgreSQL of this test's own that accepts only TLS connections
//! (`hostssl` in its pg_hba.conf), reached with each `sslmode`; and a Redis of its own that
//! speaks only TLS, reached with `rediss://`. Certificates are generated here; the system
//! roots the gateway reads are pointed at the test CA with `SSL_CERT_FILE`, which the
//! system-root loader honours. Both servers are stopped by PID.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use http::{Method, Request, StatusCode};
use orcheo_gateway::app::Gateway;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde_json::{json, Value};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A server certificate for `localhost` only (not for 127.0.0.1): (chain PEM, key PEM).
fn server_cert(ca: &Ca) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The test CA, as the file the system-root loader reads (set once per process).
fn trust_test_ca(ca: &Ca, dir: &Path) -> PathBuf {
    let path = dir.join("ca.pem");
    std::fs::write(&path, ca.cert.pem()).unwrap();
    path
}

fn run(command: &mut Command) {
    let output = command.output().expect("the command runs");
    assert!(
        output.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A PostgreSQL cluster of this test's own, accepting TLS connections only.
struct OwnPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl OwnPostgres {
    fn start(ca: &Ca) -> Option<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL binaries are required in CI"
            );
            eprintln!("\n*** SKIPPED: no PostgreSQL binaries under /usr/lib/postgresql ***\n");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("orcheo-gw-pgtls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("chown").args(["postgres:postgres"]).arg(&dir));
        let data = dir.join("data");
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null()));
        let (cert, key) = server_cert(ca);
        std::fs::write(data.join("server.crt"), cert).unwrap();
        std::fs::write(data.join("server.key"), key).unwrap();
        let port = free_port();
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nfsync = off\n",
            dir.display()
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        // Only TLS connections are let in: a plaintext one is refused outright.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&data));
        run(Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key")));
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .arg("start")
            .stdout(Stdio::null()));
        Some(OwnPostgres { dir, bin, port })
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        // pg_ctl stops the server by the PID in its postmaster.pid.
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn gateway_with_dsn(dsn: &str, up: &Upstream) -> Gateway {
    let text = yaml(
        &up.url(),
        &format!("routes: [{{name: all, path: '/**'}}]\nauth:\n  bootstrap: {{token: tls-boot}}\n  service_tokens: {{backend: postgres, postgres_dsn: \"{dsn}\"}}\n"),
    );
    let config =
        orcheo_gateway::config::load(&text, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    Gateway::start(config, None, Default::default())
        .await
        .unwrap()
}

/// Creates a token through the admin API (answered from the store) and uses it.
async fn store_works(gw: &Gateway) -> bool {
    let request = Request::builder()
        .method(Method::POST)
        .uri("/api/admin/service-tokens")
        .header("host", "gw")
        .header("authorization", "Bearer tls-boot")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            json!({}).to_string(),
        )))
        .unwrap();
    let (status, _, body) = collect(send(gw.addresses.http[0], request).await).await;
    if status != StatusCode::CREATED {
        return false;
    }
    let token: Value = serde_json::from_slice(&body).unwrap();
    let secret = format!("Bearer {}", token["secret"].as_str().unwrap());
    call(gw.addresses.http[0], "/x", &[("authorization", &secret)])
        .await
        .0
        == StatusCode::OK
}

#[tokio::test]
async fn postgres_over_tls_with_each_sslmode() {
    let ca = new_ca("test CA");
    let other = new_ca("another CA");
    let Some(pg) = OwnPostgres::start(&ca) else {
        return;
    };
    let dir = temp_dir("store-tls");
    let root = trust_test_ca(&ca, &dir);
    let wrong_root = dir.join("other.pem");
    std::fs::write(&wrong_root, other.cert.pem()).unwrap();
    let up = echo_upstream().await;
    let port = pg.port;
    let url =
        |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/postgres?{query}");
    let root = root.display().to_string();
    let wrong = wrong_root.display().to_string();
    let cases = [
        // The server refuses plaintext: without TLS nothing works.
        (url("localhost", "sslmode=disable"), false),
        (url("localhost", &format!("sslmode=verify-full&sslrootcert={root}")), true),
        (format!("host=localhost port={port} user=postgres dbname=postgres sslmode=verify-full sslrootcert='{root}'"), true),
        // The certificate names localhost, not 127.0.0.1: only the host name check fails.
        (url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={root}")), false),
        (url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={root}")), true),
        // A chain from another CA is refused whenever it is checked.
        (url("localhost", &format!("sslmode=verify-ca&sslrootcert={wrong}")), false),
        (url("localhost", &format!("sslmode=require&sslrootcert={wrong}")), false),
        // `require` alone encrypts without checking the chain.
        (url("127.0.0.1", "sslmode=require"), true),
    ];
    for (dsn, works) in cases {
        let gw = gateway_with_dsn(&dsn, &up).await;
        let admin = gw.addresses.admin.unwrap();
        let ready = if works {
            eventually(Duration::from_secs(10), || async {
                get(admin, "/readyz").await.0 == StatusCode::OK
            })
            .await
        } else {
            get(admin, "/readyz").await.0 == StatusCode::OK
        };
        assert_eq!(ready, works, "{dsn}");
        assert_eq!(store_works(&gw).await, works, "{dsn}");
        gw.shutdown().await;
    }
}

#[test]
fn check_config_refuses_unknown_sslmodes_and_missing_root_files() {
    for (dsn, problem) in [
        ("postgres://u@db/app?sslmode=sometimes", "sslmode"),
        (
            "postgres://u@db/app?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "sslrootcert",
        ),
    ] {
        let text =
            format!("auth:\n  service_tokens: {{backend: postgres, postgres_dsn: '{dsn}'}}\n");
        let errors = orcheo_gateway::config::load(&text, &Default::default()).unwrap_err();
        assert!(errors.names("auth.service_tokens.postgres_dsn"), "{errors}");
        assert!(errors.to_string().contains(problem), "{errors}");
    }
}

/// A Redis server of this test's own that speaks TLS only, stopped by PID.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    fn start(ca: &Ca, dir: &Path) -> Self {
        let (cert, key) = server_cert(ca);
        std::fs::write(dir.join("redis.crt"), cert).unwrap();
        std::fs::write(dir.join("redis.key"), key).unwrap();
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--tls-cert-file")
            .arg(dir.join("redis.crt"))
            .arg("--tls-key-file")
            .arg(dir.join("redis.key"))
            .arg("--tls-ca-cert-file")
            .arg(dir.join("ca.pem"))
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed by .ci/run");
        let redis = TlsRedis { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server with TLS did not start");
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn rate_limit_windows_are_shared_over_rediss() {
    let ca = new_ca("test CA");
    let dir = temp_dir("redis-tls");
    let root = trust_test_ca(&ca, &dir);
    // The system roots, as the gateway reads them, are the test CA's.
    std::env::set_var("SSL_CERT_FILE", &root);
    let redis = TlsRedis::start(&ca, &dir);
    let up = echo_upstream().await;
    let config = format!(
        "routes: [{{name: all, path: '/**'}}]\nauth:\n  jwt: {{secret: '{}'}}\n  rate_limit: {{ip: 2, interval: 60, redis_url: 'rediss://localhost:{}/0'}}\n",
        std::str::from_utf8(common::jwt::SECRET).unwrap(),
        redis.port
    );
    let a = gateway(&yaml(&up.url(), &config)).await;
    let b = gateway(&yaml(&up.url(), &config)).await;
    for _ in 0..2 {
        let (status, _, _) = call(a.http, "/x", &[("authorization", "Bearer not-a-token")]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // Gateway B never saw a failure: it learns of the block through Redis, over TLS
    // (the announcement arrives within a second).
    let learned = eventually(Duration::from_secs(1), || async {
        call(b.http, "/x", &[]).await.2["code"] == "auth.rate_limited.ip"
    })
    .await;
    assert!(learned, "gateway B never learned of the block");
    for gw in [&a, &b] {
        let metrics = gw.metrics().await;
        assert_eq!(
            metric_value(&metrics, "orcheo_gateway_ratelimit_redis_errors_total"),
            Some(0.0),
            "{metrics}"
        );
    }
    // The certificate is checked: it names localhost, not 127.0.0.1, so this gateway
    // cannot use Redis and falls back to its own windows (counted, never failing).
    let by_address = config.replace("rediss://localhost:", "rediss://127.0.0.1:");
    let c = gateway(&yaml(&up.url(), &by_address)).await;
    let (status, _, _) = call(c.http, "/x", &[("authorization", "Bearer not-a-token")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let errors = metric_value(
        &c.metrics().await,
        "orcheo_gateway_ratelimit_redis_errors_total",
    );
    assert!(errors.is_some_and(|e| e >= 1.0), "{errors:?}");
}
