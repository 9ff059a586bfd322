//! The CA the whole suite runs on: one an operator would plug in from Istio, made by
//! openssl as Istio's own tooling makes them, and given to the lab with `--cacerts` —
//!
//! - an **RSA-2048 root** (its key kept here, never given to warren);
//! - a **P-256 intermediate** signed by it with sha256WithRSA, which is the agents'
//!   signing CA (`ca-cert.pem`), its key in **SEC1** form as `openssl ecparam` writes;
//! - `cert-chain.pem` = intermediate + root, so every leaf is sent with its intermediate;
//! - a **two-root trust bundle** (`root-cert.pem`: the RSA root and a "next" P-256 root,
//!   as during a root rotation). The next root's key is kept in `next-root/`, so that a
//!   scenario can make a peer that chains to it — with only its leaf, as a peer whose
//!   root is configured rather than sent does.
//!
//! Every scenario therefore crosses an RSA root and an intermediate on every handshake.
use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context as _, Result};

use crate::support::{openssl, p256_key};

/// `next-root/` of the run's [`PlugInCa`].
static NEXT_ROOT: OnceLock<PathBuf> = OnceLock::new();

/// The CA directories, removed when dropped (at the end of the run).
pub struct PlugInCa {
    dir: tempfile::TempDir,
}

impl PlugInCa {
    pub fn create() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("warren-e2e-cacerts")
            .tempdir()
            .context("creating a directory for the suite's CA")?;
        let root = dir.path().join("root");
        let cacerts = dir.path().join("cacerts");
        let next = dir.path().join("next-root");
        for d in [&root, &cacerts, &next] {
            std::fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let s = |p: PathBuf| p.display().to_string();
        let extensions = dir.path().join("ca.cnf");
        std::fs::write(
            &extensions,
            "[root]\n\
             basicConstraints = critical, CA:true\n\
             keyUsage = critical, keyCertSign, cRLSign\n\
             subjectKeyIdentifier = hash\n\
             [intermediate]\n\
             basicConstraints = critical, CA:true, pathlen:0\n\
             keyUsage = critical, keyCertSign, cRLSign, digitalSignature\n\
             subjectKeyIdentifier = hash\n\
             authorityKeyIdentifier = keyid:always\n",
        )?;
        let here = dir.path();
        // The RSA root, PKCS#1 key (`-traditional`), as older Istio cacerts hold.
        openssl(
            here,
            &[
                "genrsa",
                "-traditional",
                "-out",
                &s(root.join("key.pem")),
                "2048",
            ],
        )?;
        self_signed_root(here, &root, "/O=warren-e2e/CN=Root CA (RSA)", &extensions)?;
        // The signing intermediate: P-256, key in SEC1 form.
        p256_key(here, &cacerts.join("ca-key.pem"))?;
        let csr = s(here.join("intermediate.csr"));
        openssl(
            here,
            &["req", "-new", "-key", &s(cacerts.join("ca-key.pem"))]
                .into_iter()
                .chain(["-subj", "/O=warren-e2e/CN=Intermediate CA", "-out", &csr])
                .collect::<Vec<_>>(),
        )?;
        openssl(
            here,
            &["x509", "-req", "-sha256", "-days", "730", "-in", &csr]
                .into_iter()
                .chain([
                    "-CA",
                    &s(root.join("cert.pem")),
                    "-CAkey",
                    &s(root.join("key.pem")),
                ])
                .chain([
                    "-extfile",
                    &s(extensions.clone()),
                    "-extensions",
                    "intermediate",
                ])
                .chain(["-out", &s(cacerts.join("ca-cert.pem"))])
                .collect::<Vec<_>>(),
        )?;
        // The next root, P-256, which only scenarios sign with; its files are named as
        // in a CA directory (`ca-cert.pem`, `ca-key.pem`) for `client_certificate`.
        p256_key(here, &next.join("ca-key.pem"))?;
        std::fs::rename(next.join("ca-key.pem"), next.join("key.pem"))?;
        self_signed_root(here, &next, "/O=warren-e2e/CN=Next root CA", &extensions)?;
        std::fs::rename(next.join("key.pem"), next.join("ca-key.pem"))?;
        std::fs::rename(next.join("cert.pem"), next.join("ca-cert.pem"))?;
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let (root_pem, intermediate_pem, next_pem) = (
            read(root.join("cert.pem"))?,
            read(cacerts.join("ca-cert.pem"))?,
            read(next.join("ca-cert.pem"))?,
        );
        std::fs::write(cacerts.join("cert-chain.pem"), intermediate_pem + &root_pem)?;
        std::fs::write(cacerts.join("root-cert.pem"), root_pem + &next_pem)?;
        let _ = NEXT_ROOT.set(next);
        Ok(PlugInCa { dir })
    }

    /// The `cacerts` directory the lab is brought up with.
    pub fn cacerts(&self) -> PathBuf {
        self.dir.path().join("cacerts")
    }
}

/// `dir/cert.pem`: a 10-year root for `dir/key.pem`, with the `[root]` extensions of
/// `extensions`.
fn self_signed_root(here: &Path, dir: &Path, subject: &str, extensions: &Path) -> Result<()> {
    let s = |p: &Path| p.display().to_string();
    openssl(
        here,
        &[
            "req", "-x509", "-new", "-sha256", "-days", "3650", "-subj", subject,
        ]
        .into_iter()
        .chain([
            "-key",
            &s(&dir.join("key.pem")),
            "-out",
            &s(&dir.join("cert.pem")),
        ])
        .chain(["-config", &s(extensions), "-extensions", "root"])
        .collect::<Vec<_>>(),
    )
}

/// The next root of the suite's trust bundle, as a directory `client_certificate` signs
/// with (`ca-cert.pem`, `ca-key.pem`, no `cert-chain.pem`: its leaves travel alone).
pub fn next_root() -> Result<PathBuf> {
    NEXT_ROOT
        .get()
        .cloned()
        .context("the suite's plug-in CA was not created")
}
