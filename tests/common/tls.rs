//! A throwaway CA issuing a server certificate for `localhost` / `127.0.0.1` and a client
//! certificate, as rustls configs and as PEM files.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCa {
    /// PEM file of the CA certificate, for `ca_file` / `client_ca_file`.
    pub ca_file: PathBuf,
    /// PEM files of the server certificate and key, for `[server.tls]`.
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    /// A server config presenting the server certificate.
    pub server: Arc<rustls::ServerConfig>,
    ca: Certificate,
    client: (Certificate, KeyPair),
    _dir: tempfile::TempDir,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

pub fn test_ca() -> TestCa {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client.test".to_owned()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let server_cert_file = dir.path().join("server.pem");
    let server_key_file = dir.path().join("server.key");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&server_cert_file, leaf.pem()).unwrap();
    std::fs::write(&server_key_file, leaf_key.serialize_pem()).unwrap();

    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key_der(&leaf_key))
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TestCa {
        ca_file,
        server_cert_file,
        server_key_file,
        server: Arc::new(server),
        ca,
        client: (client, client_key),
        _dir: dir,
    }
}

impl TestCa {
    /// A client config trusting this CA, presenting the client certificate if `with_cert`.
    pub fn client(&self, with_cert: bool) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        if with_cert {
            let (cert, key) = &self.client;
            builder
                .with_client_auth_cert(vec![cert.der().clone()], key_der(key))
                .unwrap()
        } else {
            builder.with_no_client_auth()
        }
    }
}
