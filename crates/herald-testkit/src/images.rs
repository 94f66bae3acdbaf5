//! The images `scripts/build-images.sh` builds (`make images`), as OCI
//! archives in `$HERALD_IMAGES` (default `~/.cache/herald-images`), named
//! in its `images.json`.

use std::{collections::HashMap, path::PathBuf};

use serde::Deserialize;

/// One image: the name it is imported under and the archive holding it.
#[derive(Debug, Clone, Deserialize)]
pub struct Image {
    /// `localhost/<name>:<tag>`: registry-qualified, so that containerd
    /// never reads it as a docker.io name and tries to pull it.
    #[serde(rename = "ref")]
    pub reference: String,
    /// The OCI archive (`ctr images import` reads it).
    pub archive: PathBuf,
}

impl Image {
    /// The reference without its tag: `localhost/herald`.
    pub fn repository(&self) -> &str {
        self.reference
            .rsplit_once(':')
            .map_or(self.reference.as_str(), |(repository, _)| repository)
    }

    /// The tag: the hash of the image's inputs.
    pub fn tag(&self) -> &str {
        self.reference.rsplit_once(':').map_or("", |(_, tag)| tag)
    }
}

/// Every image of `images.json`.
#[derive(Debug, Clone)]
pub struct Images {
    by_name: HashMap<String, Image>,
}

/// `$HERALD_IMAGES`, or `~/.cache/herald-images`.
pub fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HERALD_IMAGES") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set and neither is HERALD_IMAGES");
    PathBuf::from(home).join(".cache/herald-images")
}

const BUILD: &str = "`make images` (scripts/build-images.sh)";

impl Images {
    /// Reads `images.json`; panics naming the script to run when it, or an
    /// archive it names, is missing.
    pub fn load() -> Images {
        let manifest = images_dir().join("images.json");
        let text = std::fs::read_to_string(&manifest)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}: run {BUILD}", manifest.display()));
        let by_name: HashMap<String, Image> = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not what {BUILD} writes: {e}", manifest.display()));
        for image in by_name.values() {
            assert!(
                image.archive.is_file(),
                "{} names {}, which is missing: run {BUILD}",
                manifest.display(),
                image.archive.display()
            );
        }
        Images { by_name }
    }

    /// The image `name` (herald, nats-server, mailpit, herald-test-receiver).
    pub fn get(&self, name: &str) -> &Image {
        self.by_name
            .get(name)
            .unwrap_or_else(|| panic!("images.json has no image {name}: run {BUILD} again"))
    }

    pub fn herald(&self) -> &Image {
        self.get("herald")
    }

    pub fn nats_server(&self) -> &Image {
        self.get("nats-server")
    }

    pub fn mailpit(&self) -> &Image {
        self.get("mailpit")
    }

    pub fn test_receiver(&self) -> &Image {
        self.get("herald-test-receiver")
    }
}

/// The repository's Dockerfile, which the Herald image follows.
pub fn dockerfile() -> PathBuf {
    crate::workspace_root().join("Dockerfile")
}
