//! The cluster PKI: a CA per cluster and one certificate per node, naming the node id (as a DNS
//! subject alternative name) and good for both ends of mutual TLS.
//!
//! `agent ca init --out DIR` writes `DIR/ca.pem` and `DIR/ca.key`; `agent cert issue --ca DIR
//! --node ID --out DIR` writes `DIR/ID.pem` and `DIR/ID.key`. `--dev` makes both in memory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate and its key, as rustls wants them.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

/// What a node needs for mutual TLS: the cluster CAs it trusts and its own identity.
#[derive(Debug, Clone)]
pub struct NodeCredentials {
    /// Every certificate in `ca_file`: one CA, or the old and the new one while the cluster's
    /// CA is replaced (README, "Rotating certificates").
    pub cas: Vec<CertificateDer<'static>>,
    pub identity: Identity,
    /// The files they were read from (and are read again from on reload); `None` when made
    /// in memory.
    pub files: Option<TlsFiles>,
}

/// The `[security]` files: `ca_file`, `cert_file`, `key_file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The file behind a setting (`ca_file`, `cert_file`, `key_file`), as errors name it.
    pub fn path_of(&self, setting: &str) -> Option<&Path> {
        match setting {
            "ca_file" => Some(&self.ca),
            "cert_file" => Some(&self.cert),
            "key_file" => Some(&self.key),
            _ => None,
        }
    }
}

/// A CA: its certificate (PEM) and key (PEM).
#[derive(Debug, Clone)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A new CA for one cluster.
    pub fn generate(name: &str) -> anyhow::Result<Ca> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("grapevine cluster CA {name}"));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = valid_from();
        params.not_after = rcgen::date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    pub fn load(dir: &Path) -> anyhow::Result<Ca> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display()))
        };
        Ok(Ca { cert_pem: read("ca.pem")?, key_pem: read("ca.key")? })
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_private(&dir.join("ca.key"), &self.key_pem)?;
        std::fs::write(dir.join("ca.pem"), &self.cert_pem)
            .with_context(|| format!("writing {}", dir.join("ca.pem").display()))
    }

    /// Issues a certificate for `node_id`: (certificate PEM, key PEM).
    pub fn issue(&self, node_id: &str) -> anyhow::Result<(String, String)> {
        self.issue_for(node_id, None)
    }

    /// Issues a certificate for `node_id` good for `days` (`None`: until 2100).
    pub fn issue_for(&self, node_id: &str, days: Option<u32>) -> anyhow::Result<(String, String)> {
        crate::config::check_node_id("--node", node_id)?;
        let ca_key = KeyPair::from_pem(&self.key_pem).context("parsing the CA key")?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).context("parsing the CA certificate")?;
        let mut params = CertificateParams::new(vec![node_id.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, node_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = valid_from();
        params.not_after = match days {
            Some(d) => time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(d)),
            None => rcgen::date_time_ymd(2100, 1, 1),
        };
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Credentials for `node_id`, made in memory (for `--dev` and tests).
    pub fn credentials_for(&self, node_id: &str) -> anyhow::Result<NodeCredentials> {
        let (cert, key) = self.issue(node_id)?;
        Ok(credentials_from_pem(&self.cert_pem, &cert, &key)?)
    }
}

/// When a certificate starts being valid: an hour ago, so that a peer whose clock is a little
/// behind accepts it at once (rcgen's default is 1975).
fn valid_from() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() - time::Duration::hours(1)
}

/// When a certificate stops being valid, in Unix seconds.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(x509.validity().not_after.timestamp())
}

/// One of the `[security]` files that cannot be used: which setting, the file, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {}: {why}", .setting, .path.as_ref().map(|p| p.display().to_string()).unwrap_or_default())]
pub struct CredentialsError {
    /// `ca_file`, `cert_file` or `key_file`.
    pub setting: &'static str,
    /// None for PEM text made in memory.
    pub path: Option<PathBuf>,
    pub why: String,
}

impl CredentialsError {
    fn new(setting: &'static str, why: impl Into<String>) -> Self {
        CredentialsError { setting, path: None, why: why.into() }
    }
}

/// Parses PEM text into credentials.
pub fn credentials_from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<NodeCredentials, CredentialsError> {
    let certificates = |setting: &'static str, pem: &str| {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CredentialsError::new(setting, format!("it holds no valid PEM certificate ({e})")))?;
        if certs.is_empty() {
            return Err(CredentialsError::new(setting, "it holds no PEM certificate"));
        }
        Ok(certs)
    };
    let cas = certificates("ca_file", ca_pem)?;
    let chain = certificates("cert_file", cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| CredentialsError::new("key_file", format!("it holds no PEM private key ({e})")))?;
    Ok(NodeCredentials { cas, identity: Identity { chain, key }, files: None })
}

/// Reads the `[security]` files; an error names the file at fault.
pub fn load_credentials(files: &TlsFiles) -> Result<NodeCredentials, CredentialsError> {
    let read = |setting: &'static str, path: &Path| {
        std::fs::read_to_string(path).map_err(|e| CredentialsError {
            setting,
            path: Some(path.to_path_buf()),
            why: format!("cannot read it ({e})"),
        })
    };
    let (ca, cert, key) = (read("ca_file", &files.ca)?, read("cert_file", &files.cert)?, read("key_file", &files.key)?);
    let creds = credentials_from_pem(&ca, &cert, &key)
        .map_err(|e| CredentialsError { path: files.path_of(e.setting).map(Path::to_path_buf), ..e })?;
    Ok(NodeCredentials { files: Some(files.clone()), ..creds })
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// `agent ca init --out DIR`.
pub fn ca_init(out: &Path, cluster: &str) -> anyhow::Result<()> {
    if out.join("ca.key").exists() {
        anyhow::bail!("{} already exists; refusing to overwrite a CA key", out.join("ca.key").display());
    }
    Ca::generate(cluster)?.save(out)
}

/// `agent cert issue --ca DIR --node ID --out DIR [--force]`: the node id must be one the agent
/// accepts, and an existing `DIR/ID.key` is replaced only with `force`.
pub fn cert_issue(ca_dir: &Path, node: &str, out: &Path, force: bool, days: Option<u32>) -> anyhow::Result<()> {
    crate::config::check_node_id("--node", node)?;
    let key_file = out.join(format!("{node}.key"));
    if key_file.exists() && !force {
        anyhow::bail!("{} already exists; refusing to overwrite a node key (--force replaces it)", key_file.display());
    }
    let ca = Ca::load(ca_dir)?;
    let (cert, key) = ca.issue_for(node, days)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Both written whole to temporary files first, then renamed into place back to back: an
    // agent reloading (or a crash) meanwhile never finds a torn file, and the window in which
    // it could find a new key beside the old certificate (which it refuses, keeping what it
    // has) is two renames long instead of two writes.
    let staged = |text: &str, mode: u32| -> anyhow::Result<tempfile::NamedTempFile> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let mut f = tempfile::Builder::new()
            .prefix(".agent-cert-")
            .tempfile_in(out)
            .with_context(|| format!("writing into {}", out.display()))?;
        f.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.as_file().sync_all()?;
        Ok(f)
    };
    let (key_tmp, cert_tmp) = (staged(&key, 0o600)?, staged(&cert, 0o644)?);
    key_tmp.persist(&key_file).with_context(|| format!("writing {}", key_file.display()))?;
    let cert_file = out.join(format!("{node}.pem"));
    cert_tmp.persist(&cert_file).with_context(|| format!("writing {}", cert_file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_certificates_that_load() {
        let dir = tempfile::tempdir().unwrap();
        ca_init(dir.path(), "prod").unwrap();
        assert!(ca_init(dir.path(), "prod").is_err(), "never overwrites a CA");
        cert_issue(dir.path(), "web-1", dir.path(), false, None).unwrap();
        let files = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("web-1.pem"),
            key: dir.path().join("web-1.key"),
        };
        let creds = load_credentials(&files).unwrap();
        assert_eq!(creds.files, Some(files), "kept for reloading");
        assert_eq!(creds.identity.chain.len(), 1);
        assert!(Ca::load(dir.path()).unwrap().issue("bad id!").is_err());
    }

    #[test]
    fn cert_issue_takes_the_node_ids_an_agent_takes_and_keeps_an_existing_key() {
        let dir = tempfile::tempdir().unwrap();
        ca_init(dir.path(), "prod").unwrap();
        for bad in ["42", "web.1", "10.0.0.1", "bad id!"] {
            let e = cert_issue(dir.path(), bad, dir.path(), false, None).unwrap_err();
            let e = e.downcast_ref::<crate::config::ConfigError>().expect("a bad setting");
            assert_eq!((e.setting.as_str(), e.value.as_str()), ("--node", bad));
            assert!(!dir.path().join(format!("{bad}.pem")).exists());
        }
        cert_issue(dir.path(), "web-1", dir.path(), false, None).unwrap();
        let key = std::fs::read_to_string(dir.path().join("web-1.key")).unwrap();
        let e = cert_issue(dir.path(), "web-1", dir.path(), false, None).unwrap_err().to_string();
        assert!(e.contains("web-1.key already exists") && e.contains("--force"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.path().join("web-1.key")).unwrap(), key, "kept");
        cert_issue(dir.path(), "web-1", dir.path(), true, None).unwrap();
        assert_ne!(std::fs::read_to_string(dir.path().join("web-1.key")).unwrap(), key, "replaced with --force");
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("web-1.key"), mode("web-1.pem")), (0o600, 0o644));
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".agent-cert-"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

    #[test]
    fn a_certificate_is_good_from_an_hour_ago_for_the_days_asked() {
        let ca = Ca::generate("prod").unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (cert, _) = ca.issue_for("web-1", Some(30)).unwrap();
        let until = not_after(&der(&cert)).unwrap();
        assert!((until - now - 30 * 86_400).abs() < 60, "30 days: {until} from {now}");
        let cert_der = der(&cert);
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der).unwrap();
        let from = x509.validity().not_before.timestamp();
        assert!((now - from - 3600).abs() < 60, "an hour ago: {from}");
        let (forever, _) = ca.issue("web-1").unwrap();
        assert_eq!(not_after(&der(&forever)), Some(rcgen::date_time_ymd(2100, 1, 1).unix_timestamp()));
    }

    #[test]
    fn a_ca_file_may_hold_several_cas_and_must_hold_one() {
        let (old, new) = (Ca::generate("old").unwrap(), Ca::generate("new").unwrap());
        let (cert, key) = new.issue("web-1").unwrap();
        let bundle = format!("{}{}", old.cert_pem, new.cert_pem);
        let creds = credentials_from_pem(&bundle, &cert, &key).unwrap();
        assert_eq!(creds.cas.len(), 2, "every certificate of the bundle is trusted, not only the first");
        assert!(super::super::tls::Trust::new(&creds, "web-1").is_ok(), "a certificate from the second CA is good");
        let only_old = credentials_from_pem(&old.cert_pem, &cert, &key).unwrap();
        let err = super::super::tls::Trust::new(&only_old, "web-1").unwrap_err();
        assert_eq!(err.setting(), "cert_file");
        assert!(err.to_string().contains("not signed by a CA in ca_file"), "{err}");
        assert_eq!(credentials_from_pem("", &cert, &key).unwrap_err().setting, "ca_file", "an empty CA file");
        assert_eq!(credentials_from_pem(&key, &cert, &key).unwrap_err().setting, "ca_file", "a key for the CA");
    }

    #[test]
    fn a_key_of_another_certificate_is_the_key_files_fault() {
        let ca = Ca::generate("prod").unwrap();
        let (cert, _) = ca.issue("web-1").unwrap();
        let (_, other_key) = ca.issue("web-1").unwrap();
        let creds = credentials_from_pem(&ca.cert_pem, &cert, &other_key).unwrap();
        let err = super::super::tls::Trust::new(&creds, "web-1").unwrap_err();
        assert_eq!(err.setting(), "key_file", "{err}");
        assert!(err.to_string().contains("the certificate and key do not match"), "{err}");
    }

    #[test]
    fn each_file_that_cannot_be_used_names_its_own_setting_and_path() {
        let dir = tempfile::tempdir().unwrap();
        ca_init(dir.path(), "prod").unwrap();
        cert_issue(dir.path(), "web-1", dir.path(), false, None).unwrap();
        let garbage = dir.path().join("cluster.key");
        std::fs::write(&garbage, "c2VjcmV0IGtleSBieXRlcyBoZXJlIDMyIGJ5dGVzIQ==\n").unwrap();
        let good = TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("web-1.pem"),
            key: dir.path().join("web-1.key"),
        };
        let missing = dir.path().join("missing.pem");
        let cases = [
            (TlsFiles { ca: garbage.clone(), ..good.clone() }, "ca_file", &garbage, "holds no PEM certificate"),
            (TlsFiles { cert: garbage.clone(), ..good.clone() }, "cert_file", &garbage, "holds no PEM certificate"),
            (TlsFiles { key: garbage.clone(), ..good.clone() }, "key_file", &garbage, "holds no PEM private key"),
            (TlsFiles { key: good.cert.clone(), ..good.clone() }, "key_file", &good.cert, "holds no PEM private key"),
            (TlsFiles { ca: missing.clone(), ..good.clone() }, "ca_file", &missing, "cannot read it"),
            (TlsFiles { key: missing.clone(), ..good.clone() }, "key_file", &missing, "cannot read it"),
        ];
        for (files, setting, path, why) in cases {
            let e = load_credentials(&files).unwrap_err();
            assert_eq!((e.setting, e.path.as_ref()), (setting, Some(path)), "{e}");
            assert!(e.why.contains(why), "{e}");
            assert!(e.to_string().starts_with(&format!("{setting} {}: ", path.display())), "{e}");
        }
    }
}
