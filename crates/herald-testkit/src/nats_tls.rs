//! Certificates for a nats-server with TLS: a CA, a server certificate for
//! 127.0.0.1 and a client certificate it signs, and a second CA nobody
//! trusts, written as PEM files into a temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;
use time::OffsetDateTime;

/// PEM files: `ca.pem`, `server.pem` + `server-key.pem`, `client.pem` +
/// `client-key.pem` (signed by `ca.pem`), and `other-ca.pem`,
/// `other-client.pem` + `other-client-key.pem` (signed by a CA the server
/// does not trust).
pub struct TestPki {
    dir: TempDir,
}

struct Authority {
    key: KeyPair,
    params: CertificateParams,
}

impl Authority {
    fn new(name: &str) -> (Authority, String) {
        let key = KeyPair::generate().expect("cannot generate an ECDSA key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let pem = params
            .self_signed(&key)
            .expect("cannot self-sign a CA certificate")
            .pem();
        (Authority { key, params }, pem)
    }

    /// A leaf for `purpose`, valid for 127.0.0.1 and localhost; (cert, key).
    fn leaf(&self, name: &str, purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().expect("cannot generate an ECDSA key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("valid subject alternative names");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![purpose];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let certificate = params
            .signed_by(&key, &issuer)
            .expect("cannot sign a certificate");
        (certificate.pem(), key.serialize_pem())
    }
}

fn validity(params: &mut CertificateParams) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(2);
}

impl TestPki {
    pub fn generate() -> TestPki {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("cannot write a PEM file")
        };
        let (ca, ca_pem) = Authority::new("herald-test-ca");
        write("ca.pem", &ca_pem);
        let (cert, key) = ca.leaf("nats-server", ExtendedKeyUsagePurpose::ServerAuth);
        write("server.pem", &cert);
        write("server-key.pem", &key);
        let (cert, key) = ca.leaf("herald", ExtendedKeyUsagePurpose::ClientAuth);
        write("client.pem", &cert);
        write("client-key.pem", &key);
        let (other, other_pem) = Authority::new("untrusted-ca");
        write("other-ca.pem", &other_pem);
        let (cert, key) = other.leaf("intruder", ExtendedKeyUsagePurpose::ClientAuth);
        write("other-client.pem", &cert);
        write("other-client-key.pem", &key);
        TestPki { dir }
    }

    /// The path of one of the files named in [`TestPki`].
    pub fn path(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        assert!(path.exists(), "no {name} in the test PKI");
        path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A nats-server `tls` block: TLS required, client certificates signed
    /// by `ca.pem` required too (mutual TLS).
    pub fn server_tls_block(&self) -> String {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}\n",
            self.path("server.pem").display(),
            self.path("server-key.pem").display(),
            self.path("ca.pem").display(),
        )
    }
}
