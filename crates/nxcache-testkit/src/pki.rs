//! Certificates for the peer TLS tests, made with the `openssl` command: the cluster's CA
//! with a node certificate it signed, and a stranger (a certificate for the same address,
//! signed by another CA). Every certificate names `IP:127.0.0.1` and serves both as a
//! server and as a client certificate.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files, in the directory given to [`TestPki::make`]: `ca.pem`/`ca.key`,
/// `node.pem`/`node.key` (signed by `ca`), `stranger-ca.pem`/`stranger-ca.key` and
/// `stranger.pem`/`stranger.key` (signed by `stranger-ca`).
pub struct TestPki {
    dir: PathBuf,
}

impl TestPki {
    /// Writes the two CAs and their leaves into `dir` (which must exist). Panics with
    /// openssl's message when a step fails (openssl is needed to run the TLS tests).
    pub fn make(dir: &Path) -> TestPki {
        let pki = TestPki {
            dir: dir.to_path_buf(),
        };
        std::fs::write(
            pki.path("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("write ext.cnf");
        const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        for (ca, leaf) in [("ca", "node"), ("stranger-ca", "stranger")] {
            let subject = format!("/CN=nxcache-test-{ca}");
            let (ca_key, ca_pem) = (format!("{ca}.key"), format!("{ca}.pem"));
            let mut args = vec!["req", "-x509", "-nodes", "-days", "2", "-subj", &subject];
            args.extend(EC);
            args.extend(["-keyout", &ca_key, "-out", &ca_pem]);
            pki.openssl(&args);

            let subject = format!("/CN={leaf}");
            let (key, csr, pem) = (
                format!("{leaf}.key"),
                format!("{leaf}.csr"),
                format!("{leaf}.pem"),
            );
            let mut args = vec!["req", "-nodes", "-subj", &subject];
            args.extend(EC);
            args.extend(["-keyout", &key, "-out", &csr]);
            pki.openssl(&args);
            pki.openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_pem,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                &pem,
            ]);
        }
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(&self.dir)
            .args(args)
            .output()
            .expect("run openssl (needed to make test certificates)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The path of one of the files (`"ca.pem"`, `"node.key"`, ...).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The files a node presenting `leaf`'s certificate is given: its certificate, its
    /// key, and the cluster CA (`ca.pem`) it trusts.
    pub fn node_files(&self, leaf: &str) -> [PathBuf; 3] {
        [
            self.path(&format!("{leaf}.pem")),
            self.path(&format!("{leaf}.key")),
            self.path("ca.pem"),
        ]
    }

    /// The contents of one of the files.
    pub fn read(&self, name: &str) -> Vec<u8> {
        let path = self.path(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }
}
