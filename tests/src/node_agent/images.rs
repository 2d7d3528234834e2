//! What this project's container images provide that a pod spec does not say, in local terms: their
//! ENTRYPOINT and CMD (a container may give only `args`), the ENV they set, and where the files they ship
//! are on this machine. One entry per image of `docker/`; keep it in step with those Dockerfiles.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::repo_root;

/// The parts of an image's configuration the node agent honours.
pub(super) struct ImageDefaults {
    /// `ENTRYPOINT`, used when the container has no `command`.
    pub(super) entrypoint: &'static [&'static str],
    /// `CMD`, used when the container has neither `command` nor `args`.
    pub(super) cmd: &'static [&'static str],
    /// `ENV`; the container's own env wins.
    pub(super) env: &'static [(&'static str, &'static str)],
    /// Folders the image ships (`COPY configs /configs`), rewritten like volume mount paths.
    pub(super) paths: Vec<(&'static str, PathBuf)>,
}

/// The last path segment of an image reference's repository: `ghcr.io/vissl-rs/operator:0.1.0` ->
/// `operator`, so registry, organisation and tag do not matter.
fn repository_name(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last)
}

/// The defaults of `image` when it is one of this project's images (`docker/*.Dockerfile`).
pub(super) fn image_defaults(image: &str) -> Option<ImageDefaults> {
    let configs = repo_root().join("configs");
    match repository_name(image) {
        // docker/operator.Dockerfile
        "operator" | "vissl-operator" => Some(ImageDefaults {
            entrypoint: &["/vissl-operator"],
            cmd: &["run"],
            env: &[("VISSL_CONFIGS", "/configs")],
            paths: vec![("/configs", configs)],
        }),
        // docker/trainer.Dockerfile
        "vissl" => Some(ImageDefaults {
            entrypoint: &["vissl"],
            cmd: &["--help"],
            env: &[("VISSL_CONFIGS", "/opt/vissl/configs")],
            paths: vec![("/opt/vissl/configs", configs)],
        }),
        _ => None,
    }
}

/// The local binaries that stand in for the images' executables, by the name a pod's command (or the
/// image's entrypoint) gives them: `$VISSL_BIN` / `$VISSL_OPERATOR_BIN`, else this repository's release
/// build.
pub(super) fn default_binaries() -> BTreeMap<String, PathBuf> {
    let built = |env: &str, name: &str| {
        std::env::var_os(env)
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/release").join(name))
    };
    BTreeMap::from([
        ("vissl".to_string(), built("VISSL_BIN", "vissl")),
        (
            "/vissl-operator".to_string(),
            built("VISSL_OPERATOR_BIN", "vissl-operator"),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_recognised_by_repository_name_whatever_the_registry_and_tag() {
        assert_eq!(
            repository_name("ghcr.io/vissl-rs/operator:0.1.0"),
            "operator"
        );
        assert_eq!(
            repository_name("localhost:5000/vissl-operator"),
            "vissl-operator"
        );
        assert_eq!(repository_name("vissl@sha256:abcd"), "vissl");
        assert!(image_defaults("ghcr.io/vissl-rs/operator:0.1.0").is_some());
        assert!(image_defaults("ghcr.io/vissl-rs/vissl:0.1.0").is_some());
        assert!(image_defaults("busybox:1.36").is_none());
    }
}
