use std::io::Write;
use std::path::Path;

use rand::RngCore;

/// A new random token: 32 bytes from the OS generator, hex, with a recognisable prefix
/// (so secret scanners and people can tell what it is).
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let mut out = String::from("nxc_");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Reads the token kept at `path`, or creates one there (mode 0600, readable by the
/// server's user only). Returns the token and whether it was just created.
pub fn load_or_create_token(path: &Path) -> std::io::Result<(String, bool)> {
    match std::fs::read_to_string(path) {
        Ok(existing) => {
            let token = existing.trim().to_owned();
            if token.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} is empty; delete it to generate a new token",
                        path.display()
                    ),
                ));
            }
            Ok((token, false))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let token = generate_token();
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(path)?;
            file.write_all(token.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            Ok((token, true))
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let a = generate_token();
        assert_eq!(a.len(), 4 + 64);
        assert_ne!(a, generate_token());
    }

    #[test]
    fn the_token_file_is_created_once_private_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let (first, created) = load_or_create_token(&path).unwrap();
        assert!(created);
        let (again, created) = load_or_create_token(&path).unwrap();
        assert!(!created);
        assert_eq!(first, again);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
