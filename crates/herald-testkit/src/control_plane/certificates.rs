//! The control plane's certificates, as envtest makes them: self-signed
//! CAs with ECDSA P-256 keys, the API server's serving certificate, and
//! client certificates that name a user and its groups.

use std::path::Path;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SigningKey,
};
use time::OffsetDateTime;
use yasna::{DERWriter, Tag, models::ObjectIdentifier, models::UTCTime};

use super::{unique_number, write_file};

/// Leaf certificates are valid this long (envtest: 168 hours).
const LEAF_VALIDITY: time::Duration = time::Duration::days(7);

/// The API server's certificate authorities; the service-account signer,
/// the third, is needed only in its files.
pub(super) struct Pki {
    /// Signed the serving certificate: what clients trust.
    pub(super) serving_ca: CertificateAuthority,
    /// Signs client certificates: who users are.
    pub(super) client_ca: CertificateAuthority,
}

/// Three independent CAs, as envtest makes them, written into `certs` under
/// the names kube-apiserver's flags ([`super::apiserver`]) give: the
/// serving pair `apiserver.crt`/`.key` (found in `--cert-dir` by name),
/// the service-account signer `sa-signer.crt`/`.key` and the client CA
/// `client-cert-auth-ca.crt`.
///
/// Also the serving CA's certificate `serving-ca.crt` (what in-cluster
/// clients trust) and, signed by the client CA, `kubelet-client.crt`/`.key`
/// for the API server's calls to kubelets (user
/// `kube-apiserver-kubelet-client`, group `system:masters`). `extra_names`
/// (DNS names or IP addresses) go into the serving certificate beside
/// `localhost` and 127.0.0.1.
pub(super) fn write_pki(certs: &Path, extra_names: &[String]) -> Pki {
    std::fs::create_dir(certs).expect("cannot create the certificate directory");
    let serving_ca = CertificateAuthority::new();
    let serving = serving_ca.serving_certificate(extra_names);
    write_file(&certs.join("apiserver.crt"), &serving.certificate_pem);
    write_file(&certs.join("apiserver.key"), &serving.key_pem);
    write_file(&certs.join("serving-ca.crt"), &serving_ca.certificate_pem);
    let sa_signer = CertificateAuthority::new();
    write_file(&certs.join("sa-signer.crt"), &sa_signer.certificate_pem);
    write_file(&certs.join("sa-signer.key"), &sa_signer.key.serialize_pem());
    let client_ca = CertificateAuthority::new();
    write_file(
        &certs.join("client-cert-auth-ca.crt"),
        &client_ca.certificate_pem,
    );
    let kubelet_client =
        client_ca.client_certificate("kube-apiserver-kubelet-client", &["system:masters"]);
    write_file(
        &certs.join("kubelet-client.crt"),
        &kubelet_client.certificate_pem,
    );
    write_file(&certs.join("kubelet-client.key"), &kubelet_client.key_pem);
    Pki {
        serving_ca,
        client_ca,
    }
}

/// A certificate with its private key, both PEM (the key PKCS#8).
pub(super) struct CertifiedKey {
    pub(super) certificate_pem: String,
    pub(super) key_pem: String,
}

/// A self-signed CA with an ECDSA P-256 key, as envtest's tinyca makes
/// them: CN `envtest-environment`, O `envtest`.
pub(super) struct CertificateAuthority {
    pub(super) key: KeyPair,
    params: CertificateParams,
    pub(super) certificate_pem: String,
    /// The CA's subject Name exactly as encoded in its certificate: the
    /// issuer of everything it signs.
    subject_der: Vec<u8>,
}

impl CertificateAuthority {
    pub(super) fn new() -> CertificateAuthority {
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
    /// IP 127.0.0.1, and `extra_names`.
    pub(super) fn serving_certificate(&self, extra_names: &[String]) -> CertifiedKey {
        let key = KeyPair::generate().expect("cannot generate an ECDSA key");
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        names.extend_from_slice(extra_names);
        let mut params = CertificateParams::new(names).expect("valid subject alternative names");
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
    pub(super) fn client_certificate(&self, user: &str, groups: &[&str]) -> CertifiedKey {
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
