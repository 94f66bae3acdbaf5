//! A real Kubernetes control plane for tests, without Docker: etcd and
//! kube-apiserver on loopback, started the way controller-runtime's envtest
//! does, from the binaries `scripts/install-control-plane.sh` builds.
//!
//! Only the API server runs: no controller-manager, scheduler or kubelet. So
//! objects are stored, validated, admitted and authorized for real, but
//! nothing acts on them: Deployments never become ready, namespaces stay
//! `Terminating`, ownerReferences are never garbage-collected and no default
//! ServiceAccounts appear.

use std::{
    ffi::OsStr,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SigningKey,
};
use tempfile::TempDir;
use time::OffsetDateTime;
use yasna::{DERWriter, Tag, models::ObjectIdentifier, models::UTCTime};

use crate::{free_port, process::ChildProcess, tools::installed, wait_until};

/// How many times `start` tries again on fresh ports when a port it picked
/// was taken before the server could bind it (envtest tries 5 times too).
const ATTEMPTS: usize = 5;
/// Deadline for each server to become ready. Generous: tests start several
/// control planes at once on small machines.
const STARTUP: Duration = Duration::from_secs(90);
/// After `/healthz`, how long the bootstrap controller may take to create
/// namespace `default`.
const DEFAULT_NAMESPACE: Duration = Duration::from_secs(30);
/// How much longer `wait_until`'s own deadlines are than ours, which panic
/// with the server's log.
const SLACK: Duration = Duration::from_secs(5);
/// SIGTERM grace period before SIGKILL, per process.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Leaf certificates are valid this long (envtest: 168 hours).
const LEAF_VALIDITY: time::Duration = time::Duration::days(7);

/// etcd and kube-apiserver on free loopback ports, with RBAC authorization
/// and client-certificate users; stopped (SIGTERM, then SIGKILL) and deleted
/// when dropped, also when a test panics.
///
/// The admin user (`admin`, group `system:masters`) is in
/// [`kubeconfig_path`](Self::kubeconfig_path); [`kubeconfig_for`](Self::kubeconfig_for)
/// makes one for any other user and groups.
pub struct ControlPlane {
    // Stopped in Drop, before `dir` (their data and logs) is removed.
    apiserver: Option<ChildProcess>,
    etcd: Option<ChildProcess>,
    port: u16,
    etcd_url: String,
    serving_ca_pem: String,
    client_ca: CertificateAuthority,
    kubeconfig: PathBuf,
    dir: TempDir,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver; returns once `/healthz` answers and
    /// namespace `default` exists. A port race (a port picked free was taken
    /// before the server bound it) makes it start again on new ports, up to
    /// 5 times; any other failure panics with the server's log.
    pub async fn start() -> ControlPlane {
        let binaries = Binaries::find();
        let mut failures = Vec::new();
        for attempt in 1..=ATTEMPTS {
            match try_start(&binaries).await {
                Ok(plane) => return plane,
                Err(port_taken) => {
                    eprintln!(
                        "control plane: attempt {attempt} of {ATTEMPTS} lost a port race, starting again on new ports: {port_taken}"
                    );
                    failures.push(port_taken);
                }
            }
        }
        panic!(
            "the control plane did not start in {ATTEMPTS} attempts, each losing a port race:\n{}",
            failures.join("\n")
        );
    }

    /// `https://127.0.0.1:<port>`: the API server.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:<port>`: etcd's client URL.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The PEM certificate of the CA that signed the API server's serving
    /// certificate (the kubeconfigs' `certificate-authority-data`).
    pub fn serving_ca_pem(&self) -> &str {
        &self.serving_ca_pem
    }

    /// A kubeconfig for user `admin` in group `system:masters`: allowed
    /// everything, whatever RBAC says.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig for `user` in `groups` (a client certificate with
    /// CN `user` and one O per group, signed by the API server's client CA)
    /// and returns its path. The API server adds `system:authenticated`;
    /// everything else is up to RBAC. For a ServiceAccount-like identity use
    /// `system:serviceaccount:<namespace>:<name>` in groups
    /// `system:serviceaccounts` and `system:serviceaccounts:<namespace>`.
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> PathBuf {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let file: String = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = self.dir.path().join(format!(
            "kubeconfig-{file}-{}",
            MADE.fetch_add(1, Ordering::Relaxed)
        ));
        let identity = self.client_ca.client_certificate(user, groups);
        write_kubeconfig(
            &path,
            &self.server_url(),
            &self.serving_ca_pem,
            user,
            &identity,
        );
        path
    }

    /// Runs the installed kubectl as admin with `args`; returns what it
    /// printed and its exit status (check it: this does not).
    pub fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kubectl_as(&self.kubeconfig, args)
    }

    /// Runs the installed kubectl with `kubeconfig` (one from
    /// [`kubeconfig_for`](Self::kubeconfig_for)) and `args`.
    pub fn kubectl_as<I, S>(&self, kubeconfig: &Path, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = self.kubectl_command(kubeconfig);
        command.args(args);
        command
            .output()
            .unwrap_or_else(|e| panic!("cannot run kubectl: {e}"))
    }

    /// A `Command` for the installed kubectl with `kubeconfig`, for what
    /// [`kubectl`](Self::kubectl) cannot do (stdin, environment). Its
    /// discovery cache is kept in the control plane's directory, not in
    /// `~/.kube`.
    pub fn kubectl_command(&self, kubeconfig: &Path) -> Command {
        let mut command = Command::new(control_plane_tool("kubectl"));
        command
            .env("KUBECONFIG", kubeconfig)
            .env("KUBECACHEDIR", self.dir.path().join("kube-cache"));
        command
    }

    /// Runs the installed helm as admin with `args`. helm's cache, config and
    /// data directories and its discovery cache are in the control plane's
    /// directory, not in `~`.
    pub fn helm<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let home = self.dir.path().join("helm");
        Command::new(control_plane_tool("helm"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", self.dir.path().join("kube-cache"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run helm: {e}"))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The API server first, while its etcd is still there to let it shut
        // down cleanly.
        let processes: Vec<ChildProcess> = [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
            .collect();
        if processes.is_empty() {
            return;
        }
        // ChildProcess::stop is async and Drop is not; Drop may run inside a
        // runtime of either flavour or outside any, so stop them on a thread
        // of our own. Whatever goes wrong there, dropping a ChildProcess
        // still SIGKILLs it.
        let stopper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("cannot build a runtime to stop the control plane");
            runtime.block_on(async {
                for mut process in processes {
                    process.stop(STOP_GRACE).await;
                }
            });
        });
        let _ = stopper.join();
    }
}

/// The installed programs the control plane runs.
struct Binaries {
    etcd: PathBuf,
    apiserver: PathBuf,
}

impl Binaries {
    /// Panics with the way to install them when one is missing; kubectl is
    /// checked too, so a test fails at start rather than halfway.
    fn find() -> Binaries {
        control_plane_tool("kubectl");
        Binaries {
            etcd: control_plane_tool("etcd"),
            apiserver: control_plane_tool("kube-apiserver"),
        }
    }
}

/// Like [`crate::tool`], naming the script that builds the control plane.
fn control_plane_tool(name: &str) -> PathBuf {
    installed(
        name,
        "`make control-plane` (scripts/install-control-plane.sh)",
    )
}

/// One attempt. `Err` only for a lost port race (worth another attempt);
/// every other failure panics.
async fn try_start(binaries: &Binaries) -> Result<ControlPlane, String> {
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    let http = crate::http_client();

    // etcd, plain HTTP on loopback, as envtest runs it. A unique member name
    // lets the readiness probe tell our etcd from another test's that won a
    // port race.
    let etcd_port = free_port();
    let peer_port = free_port();
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let name = format!(
        "herald-test-{}-{}",
        std::process::id(),
        unique_number() % 1_000_000_000
    );
    let etcd_args = [
        format!("--name={name}"),
        format!("--data-dir={}", dir.path().join("etcd").display()),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster={name}={peer_url}"),
        // Nothing here needs to survive a power cut.
        "--unsafe-no-fsync=true".to_string(),
    ];
    let etcd_log = dir.path().join("etcd.log");
    let mut etcd = ChildProcess::spawn("etcd", &binaries.etcd, &etcd_args, etcd_log.clone());
    let members = format!("{etcd_url}/v3/cluster/member/list");
    let give_up = Instant::now() + STARTUP;
    wait_until("etcd to become ready", STARTUP + SLACK, || {
        let port_taken = port_taken(&etcd_log);
        if port_taken.is_none() {
            etcd.assert_running();
            assert_in_time(&etcd, "etcd", give_up, "become ready");
        }
        let request = http.post(&members).body("{}").send();
        let name = name.clone();
        async move {
            if let Some(taken) = port_taken {
                return Some(Err(format!("etcd: {taken}")));
            }
            let response = request.await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            let members = response.text().await.ok()?;
            members
                .contains(&format!("\"name\":\"{name}\""))
                .then_some(Ok(()))
        }
    })
    .await?;

    // Certificates, as envtest makes them: three independent CAs.
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).expect("cannot create the certificate directory");
    let serving_ca = CertificateAuthority::new();
    let serving = serving_ca.serving_certificate();
    write_file(&certs.join("apiserver.crt"), &serving.certificate_pem);
    write_file(&certs.join("apiserver.key"), &serving.key_pem);
    let sa_signer = CertificateAuthority::new();
    write_file(&certs.join("sa-signer.crt"), &sa_signer.certificate_pem);
    write_file(&certs.join("sa-signer.key"), &sa_signer.key.serialize_pem());
    let client_ca = CertificateAuthority::new();
    write_file(
        &certs.join("client-cert-auth-ca.crt"),
        &client_ca.certificate_pem,
    );

    // kube-apiserver with envtest's flags. Its serving pair is found in
    // --cert-dir by name (apiserver.crt/.key). There is no
    // --advertise-address: loopback is refused, so it derives one from the
    // default route.
    let port = free_port();
    let apiserver_args = [
        format!("--etcd-servers={etcd_url}"),
        format!("--cert-dir={}", certs.display()),
        format!("--secure-port={port}"),
        "--bind-address=127.0.0.1".to_string(),
        "--service-cluster-ip-range=10.0.0.0/24".to_string(),
        "--allow-privileged=true".to_string(),
        // No controller-manager creates default ServiceAccounts, so this
        // plugin would refuse every pod.
        "--disable-admission-plugins=ServiceAccount".to_string(),
        "--authorization-mode=RBAC".to_string(),
        format!("--service-account-issuer=https://127.0.0.1:{port}/"),
        format!(
            "--service-account-key-file={}",
            certs.join("sa-signer.crt").display()
        ),
        format!(
            "--service-account-signing-key-file={}",
            certs.join("sa-signer.key").display()
        ),
        format!(
            "--client-ca-file={}",
            certs.join("client-cert-auth-ca.crt").display()
        ),
    ];
    let apiserver_log = dir.path().join("kube-apiserver.log");
    let mut apiserver = ChildProcess::spawn(
        "kube-apiserver",
        &binaries.apiserver,
        &apiserver_args,
        apiserver_log.clone(),
    );
    let server_url = format!("https://127.0.0.1:{port}");

    // Only a server presenting our serving certificate counts: that is how a
    // port race with another test's API server shows.
    let trusting = |identity: Option<&CertifiedKey>| {
        let mut builder =
            reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(
                serving_ca.certificate_pem.as_bytes(),
            )
            .expect("the serving CA is valid PEM")]);
        if let Some(identity) = identity {
            let pem = format!("{}{}", identity.certificate_pem, identity.key_pem);
            builder = builder.identity(
                reqwest::Identity::from_pem(pem.as_bytes()).expect("the identity is valid PEM"),
            );
        }
        builder
            .build()
            .expect("cannot build an HTTPS client for the API server")
    };
    let probe = trusting(None);
    let healthz = format!("{server_url}/healthz");
    let give_up = Instant::now() + STARTUP;
    wait_until("kube-apiserver to become healthy", STARTUP + SLACK, || {
        let port_taken = port_taken(&apiserver_log);
        if port_taken.is_none() {
            etcd.assert_running();
            apiserver.assert_running();
            assert_in_time(&apiserver, "kube-apiserver", give_up, "answer /healthz");
        }
        let request = probe.get(&healthz).send();
        async move {
            if let Some(taken) = port_taken {
                return Some(Err(format!("kube-apiserver: {taken}")));
            }
            request.await.ok()?.status().is_success().then_some(Ok(()))
        }
    })
    .await?;

    let admin = client_ca.client_certificate("admin", &["system:masters"]);
    let as_admin = trusting(Some(&admin));
    let default_namespace = format!("{server_url}/api/v1/namespaces/default");
    let give_up = Instant::now() + DEFAULT_NAMESPACE;
    wait_until(
        "namespace default to exist",
        DEFAULT_NAMESPACE + SLACK,
        || {
            apiserver.assert_running();
            assert_in_time(
                &apiserver,
                "kube-apiserver",
                give_up,
                "create namespace default",
            );
            let request = as_admin.get(&default_namespace).send();
            async move { request.await.ok()?.status().is_success().then_some(()) }
        },
    )
    .await;

    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(
        &kubeconfig,
        &server_url,
        &serving_ca.certificate_pem,
        "admin",
        &admin,
    );
    Ok(ControlPlane {
        apiserver: Some(apiserver),
        etcd: Some(etcd),
        port,
        etcd_url,
        serving_ca_pem: serving_ca.certificate_pem,
        client_ca,
        kubeconfig,
        dir,
    })
}

/// Panics with `process`'s log once `give_up` has passed: `wait_until`'s
/// own deadline (a little later) would say what timed out but not why.
fn assert_in_time(process: &ChildProcess, name: &str, give_up: Instant, what: &str) {
    assert!(
        Instant::now() < give_up,
        "{name} did not {what} in time; its log ends:\n{}",
        process.log_tail()
    );
}

/// The line of `log` saying a port was already taken, if there is one.
fn port_taken(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .find(|line| line.contains("address already in use"))
        .map(|line| line.chars().take(500).collect())
}

fn write_file(path: &Path, contents: &str) {
    std::fs::write(path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// A kubeconfig, as JSON (which kubeconfig readers accept), readable by its
/// owner only so helm does not warn about it.
fn write_kubeconfig(
    path: &Path,
    server_url: &str,
    ca_pem: &str,
    user: &str,
    identity: &CertifiedKey,
) {
    use std::os::unix::fs::OpenOptionsExt;

    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "herald-test",
            "cluster": {
                "server": server_url,
                "certificate-authority-data": BASE64.encode(ca_pem),
            },
        }],
        "users": [{
            "name": user,
            "user": {
                "client-certificate-data": BASE64.encode(&identity.certificate_pem),
                "client-key-data": BASE64.encode(&identity.key_pem),
            },
        }],
        "contexts": [{
            "name": "herald-test",
            "context": { "cluster": "herald-test", "user": user },
        }],
        "current-context": "herald-test",
    });
    let text = serde_json::to_string_pretty(&config).expect("a kubeconfig serializes");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// A certificate with its private key, both PEM (the key PKCS#8).
struct CertifiedKey {
    certificate_pem: String,
    key_pem: String,
}

/// A self-signed CA with an ECDSA P-256 key, as envtest's tinyca makes
/// them: CN `envtest-environment`, O `envtest`.
struct CertificateAuthority {
    key: KeyPair,
    params: CertificateParams,
    certificate_pem: String,
    /// The CA's subject Name exactly as encoded in its certificate: the
    /// issuer of everything it signs.
    subject_der: Vec<u8>,
}

impl CertificateAuthority {
    fn new() -> CertificateAuthority {
        let key = KeyPair::generate().expect("cannot generate an ECDSA key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "envtest-environment");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "envtest");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        let certificate = params
            .self_signed(&key)
            .expect("cannot self-sign a CA certificate");
        let subject_der = subject_of(certificate.der());
        CertificateAuthority {
            certificate_pem: certificate.pem(),
            key,
            params,
            subject_der,
        }
    }

    /// The API server's serving certificate: CN and DNS name `localhost`,
    /// IP 127.0.0.1.
    fn serving_certificate(&self) -> CertifiedKey {
        let key = KeyPair::generate().expect("cannot generate an ECDSA key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("valid subject alternative names");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let certificate = params
            .signed_by(&key, &issuer)
            .expect("cannot sign the serving certificate");
        CertifiedKey {
            certificate_pem: certificate.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A client certificate for `user` in `groups`: CN `user`, one O per
    /// group, ExtKeyUsage ClientAuth. Written by hand rather than with rcgen,
    /// whose DistinguishedName holds one value per attribute type, while
    /// Kubernetes reads one group from each O.
    fn client_certificate(&self, user: &str, groups: &[&str]) -> CertifiedKey {
        assert_eq!(
            self.key.algorithm(),
            &rcgen::PKCS_ECDSA_P256_SHA256,
            "the CA's key is ECDSA P-256"
        );
        let key = KeyPair::generate().expect("cannot generate an ECDSA key");
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("zero nanoseconds is valid");
        let tbs = yasna::construct_der(|writer| {
            writer.write_sequence(|tbs| {
                // version: v3
                tbs.next().write_tagged(Tag::context(0), |w| w.write_u8(2));
                tbs.next()
                    .write_bigint_bytes(&unique_number().to_be_bytes(), true);
                write_ecdsa_with_sha256(tbs.next());
                tbs.next().write_der(&self.subject_der);
                tbs.next().write_sequence(|validity| {
                    validity
                        .next()
                        .write_utctime(&UTCTime::from_datetime(now - time::Duration::hours(1)));
                    validity
                        .next()
                        .write_utctime(&UTCTime::from_datetime(now + LEAF_VALIDITY));
                });
                tbs.next().write_sequence(|name| {
                    write_attribute(name.next(), &[2, 5, 4, 3], user);
                    for group in groups {
                        write_attribute(name.next(), &[2, 5, 4, 10], group);
                    }
                });
                tbs.next().write_der(&key.subject_public_key_info());
                tbs.next().write_tagged(Tag::context(3), |w| {
                    w.write_sequence(|extensions| {
                        // keyUsage, critical: digitalSignature (bit 0).
                        extensions.next().write_sequence(|e| {
                            e.next()
                                .write_oid(&ObjectIdentifier::from_slice(&[2, 5, 29, 15]));
                            e.next().write_bool(true);
                            e.next().write_bytes(&yasna::construct_der(|w| {
                                w.write_bitvec_bytes(&[0x80], 1)
                            }));
                        });
                        // extKeyUsage: clientAuth.
                        extensions.next().write_sequence(|e| {
                            e.next()
                                .write_oid(&ObjectIdentifier::from_slice(&[2, 5, 29, 37]));
                            e.next().write_bytes(&yasna::construct_der(|w| {
                                w.write_sequence(|purposes| {
                                    purposes.next().write_oid(&ObjectIdentifier::from_slice(&[
                                        1, 3, 6, 1, 5, 5, 7, 3, 2,
                                    ]))
                                })
                            }));
                        });
                        // basicConstraints, critical: not a CA.
                        extensions.next().write_sequence(|e| {
                            e.next()
                                .write_oid(&ObjectIdentifier::from_slice(&[2, 5, 29, 19]));
                            e.next().write_bool(true);
                            e.next()
                                .write_bytes(&yasna::construct_der(|w| w.write_sequence(|_| {})));
                        });
                    })
                });
            })
        });
        let signature = self
            .key
            .sign(&tbs)
            .expect("cannot sign a client certificate");
        let certificate = yasna::construct_der(|writer| {
            writer.write_sequence(|w| {
                w.next().write_der(&tbs);
                write_ecdsa_with_sha256(w.next());
                w.next().write_bitvec_bytes(&signature, signature.len() * 8);
            })
        });
        CertifiedKey {
            certificate_pem: pem("CERTIFICATE", &certificate),
            key_pem: key.serialize_pem(),
        }
    }
}

/// AlgorithmIdentifier ecdsa-with-SHA256 (RFC 5758: no parameters).
fn write_ecdsa_with_sha256(writer: DERWriter) {
    writer.write_sequence(|w| {
        w.next()
            .write_oid(&ObjectIdentifier::from_slice(&[1, 2, 840, 10045, 4, 3, 2]))
    });
}

/// One RelativeDistinguishedName holding one attribute, a UTF8String.
fn write_attribute(writer: DERWriter, oid: &[u64], value: &str) {
    writer.write_set(|set| {
        set.next().write_sequence(|attribute| {
            attribute
                .next()
                .write_oid(&ObjectIdentifier::from_slice(oid));
            attribute.next().write_utf8_string(value);
        })
    });
}

/// The subject Name of a DER certificate, exactly as encoded there.
fn subject_of(certificate: &[u8]) -> Vec<u8> {
    let (_, certificate) = der_element(certificate);
    let (_, mut tbs) = der_element(certificate);
    // version [0], serialNumber, signature, issuer, validity, then subject.
    for _ in 0..5 {
        let (element, _) = der_element(tbs);
        tbs = &tbs[element.len()..];
    }
    der_element(tbs).0.to_vec()
}

/// The DER element at the start of `der`: (the whole element, its
/// contents). For certificates we just made; panics on anything malformed.
fn der_element(der: &[u8]) -> (&[u8], &[u8]) {
    let first = usize::from(der[1]);
    let (header, length) = if first < 0x80 {
        (2, first)
    } else {
        let bytes = first & 0x7f;
        let length = der[2..2 + bytes]
            .iter()
            .fold(0usize, |length, byte| (length << 8) | usize::from(*byte));
        (2 + bytes, length)
    };
    (&der[..header + length], &der[header..header + length])
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

/// Distinct on every call in this process and across processes in
/// practice: nanoseconds since the epoch, plus a counter. Positive, below
/// 2^127, so it fits a certificate serial number (at most 20 octets).
fn unique_number() -> u128 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos();
    ((nanos << 16) + u128::from(COUNTER.fetch_add(1, Ordering::Relaxed))) & (u128::MAX >> 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_certificates_carry_every_group_and_the_ca_as_issuer() {
        let ca = CertificateAuthority::new();
        let identity = ca.client_certificate("bob", &["team-a", "team-b", "team-c"]);
        let der = BASE64
            .decode(
                identity
                    .certificate_pem
                    .lines()
                    .filter(|line| !line.starts_with("-----"))
                    .collect::<String>(),
            )
            .expect("valid base64");
        // Every part of the TBSCertificate is where it belongs.
        let (_, certificate) = der_element(&der);
        let (_, mut tbs) = der_element(certificate);
        let mut parts = Vec::new();
        while !tbs.is_empty() {
            let (element, _) = der_element(tbs);
            parts.push(element.to_vec());
            tbs = &tbs[element.len()..];
        }
        assert_eq!(
            parts.len(),
            8,
            "version, serial, alg, issuer, validity, subject, key, extensions"
        );
        assert_eq!(parts[3], ca.subject_der, "the issuer is the CA's subject");
        let subject = &parts[5];
        for value in ["bob", "team-a", "team-b", "team-c"] {
            assert!(
                subject.windows(value.len()).any(|w| w == value.as_bytes()),
                "{value} is in the subject"
            );
        }
    }
}
