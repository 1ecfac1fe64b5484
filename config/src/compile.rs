//! Validation and compilation: parsed documents to xDS resources, each encoded once and
//! versioned by its content. Every error is collected, with file, line and path.

use std::{collections::HashMap, sync::Arc};

use filterplane_api::{
    any_from_json, content_version, envoy_types::pb::envoy::config::core::v3::TypedExtensionConfig, Any, ResourceType,
    ResourceVersion,
};
use prost::Message;
use serde_json::Value;

use crate::{
    error::{ConfigError, ConfigErrors},
    model::{ExtensionConfigSpec, NodeSelector, WasmPluginSpec},
    parsed::ParsedFile,
    wasm::WasmPlugin,
};

pub use crate::compiled::{CompiledConfig, CompiledResource, Origin, Summary};

/// Steps increasing, each 1-100, the last 100.
pub fn check_rollout(r: &crate::model::RolloutSpec) -> Result<(), String> {
    if r.steps.is_empty() {
        return Err("steps: at least one (100 is all at once)".into());
    }
    if r.steps.iter().any(|s| *s == 0 || *s > 100) {
        return Err("steps: each a percent from 1 to 100".into());
    }
    if r.steps.windows(2).any(|w| w[0] >= w[1]) {
        return Err("steps: increasing".into());
    }
    if r.steps.last() != Some(&100) {
        return Err("steps: the last step is 100 (every proxy)".into());
    }
    Ok(())
}

/// The YAML sections holding Envoy resources as they are.
pub const SECTIONS: [(&str, ResourceType); 5] = [
    ("listeners", ResourceType::Listener),
    ("routes", ResourceType::RouteConfiguration),
    ("clusters", ResourceType::Cluster),
    ("endpoints", ResourceType::ClusterLoadAssignment),
    ("secrets", ResourceType::Secret),
];

/// Validates and compiles the documents as one config, collecting every error.
pub fn compile(files: &[ParsedFile]) -> Result<CompiledConfig, ConfigErrors> {
    let files: Vec<&ParsedFile> = files.iter().collect();
    compile_with(&files, &[], Previous::default()).config
}

/// The last config a loader compiled (it passed every check), and what changed since.
#[derive(Debug, Default, Clone, Copy)]
pub struct Previous<'a> {
    /// Its resources in serving order, and their summaries (or none).
    pub resources: &'a [Arc<CompiledResource>],
    pub summaries: &'a [Summary],
    /// The entries new since, and its resources that are gone (with everything its call
    /// made from documents' headers), where the caller knows them.
    pub changes: Option<crate::order::Told<'a>>,
}

/// What `compile_with` gives: the config or its errors; what it made from documents'
/// headers (extension configs, documents read whole: every call makes them anew); the
/// resources' summaries in serving order, for the next call.
#[derive(Debug)]
pub struct Compiled {
    pub config: Result<CompiledConfig, ConfigErrors>,
    pub made: Vec<Arc<CompiledResource>>,
    pub summaries: Vec<Summary>,
}

/// `compile`, where `entries[k]` are Envoy resource entries of `files[k]` already
/// compiled on their own (`resources::envoy_entry`, cached by incremental loading) and
/// left out of its document: they are checked against the rest as if read from it.
/// With `previous`, entries among its resources keep their order instead of being sorted
/// again, only names with new entries are checked for duplicates, and only new resources
/// are read for the config's version.
pub fn compile_with(files: &[&ParsedFile], entries: &[&[Arc<CompiledResource>]], previous: Previous<'_>) -> Compiled {
    let mut c = Compiler {
        rollout: None,
        verification: None,
        files,
        errors: Vec::new(),
        notices: Vec::new(),
        resources: Vec::with_capacity(entries.iter().map(|e| e.len()).sum()),
        wasm: Vec::new(),
        seen: HashMap::new(),
    };
    c.default_rollout();
    c.default_verification();
    let mut made = Vec::new();
    for (k, &file) in files.iter().enumerate() {
        let before = c.resources.len();
        for (i, spec) in file.doc.extension_configs.iter().enumerate() {
            c.extension_config(file, i, spec);
        }
        for (i, spec) in file.doc.wasm_plugins.iter().enumerate() {
            c.wasm_plugin(file, i, spec);
        }
        for (section, rt) in SECTIONS {
            for (i, spec) in file.doc.envoy_section(rt).iter().enumerate() {
                c.envoy_resource(file, section, i, rt, spec);
            }
        }
        made.extend_from_slice(&c.resources[before..]);
        for r in entries.get(k).copied().unwrap_or_default() {
            c.admit(r.clone());
        }
    }
    // In serving order (by type and name, each name's entries in file order): what
    // serving needs, and what the duplicate check walks. What was made here is new to
    // this config whatever the caller knows.
    let changes = previous.changes;
    let fresh: Option<Vec<_>> = changes.map(|(fresh, _)| fresh.iter().chain(&made).cloned().collect());
    let known = fresh.as_deref().zip(changes.map(|(_, stale)| stale));
    let ordered = crate::order::serving_order(std::mem::take(&mut c.resources), previous.resources, known);
    c.resources = ordered.resources;
    // The resources' summaries: the kept ones' from the last call, the new ones read.
    let summaries = match &ordered.placed {
        Some((placed, was)) if previous.summaries.len() == previous.resources.len() => {
            let (mut placed, mut was) = (placed.iter().peekable(), was.iter());
            let mut summaries = Vec::with_capacity(c.resources.len());
            for (i, r) in c.resources.iter().enumerate() {
                let kept = match placed.next_if(|&&p| p == i) {
                    Some(_) => None,
                    None => was.next().and_then(|&w| previous.summaries.get(w)),
                };
                summaries.push(kept.copied().unwrap_or_else(|| Summary::of(r)));
            }
            summaries
        }
        _ => c.resources.iter().map(|r| Summary::of(r)).collect(),
    };
    debug_assert!(
        summaries.len() == c.resources.len() && summaries.iter().zip(&c.resources).all(|(s, r)| *s == Summary::of(r)),
        "summaries out of step"
    );
    match &ordered.placed {
        Some((placed, _)) => c.check_duplicates_near(placed),
        None => c.check_duplicates(),
    }
    if c.errors.is_empty() {
        c.check_placements(&summaries);
    }
    if !c.errors.is_empty() {
        return Compiled { config: Err(ConfigErrors(c.errors)), made, summaries };
    }
    let config = CompiledConfig {
        version: ResourceVersion::default(),
        resources: c.resources,
        wasm_plugins: c.wasm.into_iter().map(Arc::new).collect(),
        files: files.iter().map(|f| f.path.clone()).collect(),
        wasm_verification: c.verification.clone(),
        notices: c.notices,
    };
    let version = config.version_of(&summaries);
    Compiled { config: Ok(CompiledConfig { version, ..config }), made, summaries }
}

/// Encodes an Envoy resource written as JSON; the version hashes its canonical form.
fn encode(rt: ResourceType, name: &str, mut json: Value) -> Result<(Any, ResourceVersion), (String, String)> {
    if let Value::Object(m) = &mut json {
        m.insert("@type".into(), Value::String(rt.type_url().into()));
    }
    let typed = any_from_json(&json).map_err(|e| (e.path, e.message))?;
    let version = content_version([rt.type_url().as_bytes(), name.as_bytes(), typed.canonical_json.as_bytes()]);
    Ok((typed.any, version))
}

struct Compiler<'a> {
    /// The config's default rollout (`rollout:` of a document).
    rollout: Option<crate::model::RolloutSpec>,
    /// The config's default module verification (`wasm_verification:` of a document).
    verification: Option<Arc<crate::compiled::Verification>>,
    files: &'a [&'a ParsedFile],
    errors: Vec<ConfigError>,
    /// What is worth saying about a valid config (an Istio document placed nowhere).
    notices: Vec<ConfigError>,
    resources: Vec<Arc<CompiledResource>>,
    wasm: Vec<WasmPlugin>,
    /// Extension configs and Wasm plugins so far per name: their selectors and where
    /// they are (entries of the Envoy sections are checked once sorted:
    /// `check_duplicates`).
    seen: HashMap<(ResourceType, String), Vec<(NodeSelector, Origin)>>,
}

impl<'a> Compiler<'a> {
    /// An error at `sub` (may be empty) under the entry at `origin`.
    fn error_at(&mut self, origin: &Origin, sub: &str, message: impl Into<String>) {
        let error = self.located(origin, sub, message);
        self.errors.push(error);
    }

    /// `message` at `sub` (may be empty) under the entry at `origin`, with the file, line
    /// and path as the document wrote them.
    fn located(&self, origin: &Origin, sub: &str, message: impl Into<String>) -> ConfigError {
        let path = if sub.is_empty() { origin.path.clone() } else { format!("{}.{sub}", origin.path) };
        // A file may hold several documents: the one whose lines hold the entry. Without a
        // line (its document's line index gave up) only a file's one document is known to
        // be the entry's: another's index would name a line of its own entry of that path.
        let mut documents = self.files.iter().filter(|f| f.path == origin.file);
        let line = origin.line.get();
        let document = match line {
            Some(l) => documents.find(|f| f.span.contains(&l)),
            None => documents.next().filter(|_| documents.next().is_none()),
        };
        match document {
            // (An entry compiled on its own is not in its document's index: its own line.)
            Some(f) => {
                let mut e = f.error(path, message);
                e.line = e.line.or(line);
                e
            }
            None => ConfigError { file: origin.file.clone(), line, path, message: message.into() },
        }
    }

    /// The one value of a config-wide default (`key`, as `get` reads it from a document):
    /// documents may repeat it, not differ; with the file that first gives it.
    fn one_default<T: Clone + PartialEq + 'a>(
        &mut self,
        key: &str,
        get: impl Fn(&'a ParsedFile) -> Option<&'a T>,
    ) -> Option<(T, &'a ParsedFile)> {
        let mut found: Option<(T, &ParsedFile)> = None;
        for &file in self.files {
            let Some(v) = get(file) else { continue };
            match &found {
                Some((other, at)) if other != v => {
                    let message =
                        format!("differs from the one of {}: one default for the whole config", at.path.display());
                    self.errors.push(file.error(key, message));
                }
                Some(_) => {}
                None => found = Some((v.clone(), file)),
            }
        }
        found
    }

    /// The one `rollout:` default of the config (documents may repeat it, not differ).
    fn default_rollout(&mut self) {
        for &file in self.files {
            if let Some(Err(m)) = file.doc.rollout.as_ref().map(check_rollout) {
                self.errors.push(file.error("rollout", m));
            }
        }
        let valid = |f: &'a ParsedFile| f.doc.rollout.as_ref().filter(|r| check_rollout(r).is_ok());
        self.rollout = self.one_default("rollout", valid).map(|(r, _)| r);
    }

    /// The config's `wasm_verification` (one for the whole config), its keys read.
    fn default_verification(&mut self) {
        let found = self.one_default("wasm_verification", |f: &'a ParsedFile| f.doc.wasm_verification.as_ref());
        let Some((v, file)) = found else { return };
        let base = crate::parsed::config_dir(&file.path);
        let mut keys = Vec::new();
        for (i, path) in v.keys.iter().enumerate() {
            match read_key(base, path) {
                Ok(k) => keys.push(k),
                Err(m) => self.errors.push(file.error(format!("wasm_verification.keys[{i}]"), m)),
            }
        }
        if v.require && keys.is_empty() {
            self.errors.push(file.error("wasm_verification", "require: true needs at least one key"));
        }
        self.verification =
            Some(Arc::new(crate::compiled::Verification { keys, require: v.require, signature_url: None }));
    }

    /// A plugin's verification: its own keys (which replace the default ones) or the
    /// config's; `Err` with the sub-path and message.
    fn plugin_verification(
        &self,
        base: &std::path::Path,
        spec: &crate::model::PluginVerificationSpec,
    ) -> Result<Arc<crate::compiled::Verification>, (String, String)> {
        let mut keys = Vec::new();
        for (i, path) in spec.keys.iter().enumerate() {
            keys.push(read_key(base, path).map_err(|m| (format!("verification.keys[{i}]"), m))?);
        }
        for pem in &spec.inline_keys {
            // Inline keys come from Istio's `verificationKey`.
            check_pem(pem).map_err(|m| ("verificationKey".to_owned(), m))?;
            keys.push(("inline".to_owned(), pem.clone()));
        }
        if keys.is_empty() {
            keys = self.verification.as_ref().map(|v| v.keys.clone()).unwrap_or_default();
        }
        if keys.is_empty() {
            return Err(("verification".into(), "no keys: name them here or in wasm_verification".into()));
        }
        Ok(Arc::new(crate::compiled::Verification {
            keys,
            require: spec.require.unwrap_or(true),
            signature_url: spec.signature_url.clone(),
        }))
    }

    /// Checks the name of an entry and that no earlier entry makes it unreachable.
    /// One name may have several entries for different proxies (e.g. a canary); the
    /// first entry a node matches wins, so an earlier entry with the same selector, or
    /// with none, is an error.
    fn register(
        &mut self,
        rt: ResourceType,
        kind: &str,
        name_key: &str,
        name: &str,
        sel: &NodeSelector,
        origin: &Origin,
    ) -> bool {
        if name.trim().is_empty() {
            self.error_at(origin, name_key, "must not be empty");
            return false;
        }
        let earlier = self.seen.entry((rt, name.to_owned())).or_default();
        if let Some((_, first)) = earlier.iter().find(|(s, _)| s.is_empty() || s == sel) {
            let first = first.clone();
            self.error_at(
                origin,
                name_key,
                format!(
                    "duplicate {kind} name \"{name}\": the entry at {}{}: {} already matches every proxy this one selects",
                    first.file.display(),
                    first.line.get().map(|l| format!(":{l}")).unwrap_or_default(),
                    first.path
                ),
            );
            return false;
        }
        earlier.push((sel.clone(), origin.clone()));
        true
    }

    /// The Wasm modules an extension config's code names, for the server to fetch
    /// (unless the entry says `wasm_fetch: envoy`).
    fn central_wasm(
        &mut self,
        file: &ParsedFile,
        origin: &Origin,
        spec: &ExtensionConfigSpec,
        typed: &filterplane_api::json::TypedMessage,
    ) -> Result<Option<Arc<crate::central::CentralWasm>>, ()> {
        if spec.wasm_fetch == Some(crate::model::WasmFetch::Envoy) {
            return Ok(None);
        }
        let Ok(mut json) = serde_json::from_str::<serde_json::Value>(&typed.canonical_json) else { return Ok(None) };
        let base = file.path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
        match crate::central::find(&json, &base) {
            Ok(modules) if modules.is_empty() => Ok(None),
            Ok(modules) => {
                if let Some(obj) = json.as_object_mut() {
                    obj.insert("@type".into(), serde_json::Value::String(typed.any.type_url.clone()));
                }
                Ok(Some(Arc::new(crate::central::CentralWasm { typed_config: json, modules })))
            }
            Err((path, message)) => {
                self.error_at(origin, &format!("typed_config.{path}"), message);
                Err(())
            }
        }
    }

    fn extension_config(&mut self, file: &ParsedFile, i: usize, spec: &ExtensionConfigSpec) {
        let at = format!("extension_configs[{i}]");
        let origin = Origin {
            file: file.path.clone(),
            line: file.lines.line_of(&at).into(),
            path: file.lines.original_path(&at),
        };
        let rt = ResourceType::ExtensionConfig;
        let ok = self.register(rt, "extension config", "name", &spec.name, &spec.node_selector, &origin);
        let typed = match any_from_json(&spec.typed_config) {
            Ok(t) => t,
            Err(e) => {
                let sub =
                    if e.path.is_empty() { "typed_config".to_owned() } else { format!("typed_config.{}", e.path) };
                self.error_at(&origin, &sub, e.message);
                return;
            }
        };
        let placement = match &spec.placement {
            Some(p) => match self.placement(&origin, &spec.name, &typed.any.type_url, p) {
                Some(p) => Some(Arc::new(p)),
                None => return,
            },
            None => None,
        };
        if !ok {
            return;
        }
        // Entries sharing a name are one filter in the listeners: they must agree on where.
        // (Only looked for when there is an earlier entry of the name: this runs per entry.)
        let shared_name = self.seen.get(&(rt, spec.name.clone())).is_some_and(|e| e.len() > 1);
        if let Some(other) =
            shared_name.then(|| self.resources.iter().find(|r| r.resource_type == rt && r.name == spec.name)).flatten()
        {
            if other.placement != placement {
                let at = other.origin.path.clone();
                self.error_at(&origin, "placement", format!("must be the same as in {at}, the other entry named \"{}\": the filter is placed once per listener", spec.name));
                return;
            }
        }
        let version = content_version([
            rt.type_url().as_bytes(),
            spec.name.as_bytes(),
            typed.any.type_url.as_bytes(),
            typed.canonical_json.as_bytes(),
        ]);
        if let Some(Err(m)) = spec.rollout.as_ref().map(check_rollout) {
            self.error_at(&origin, "rollout", m);
            return;
        }
        let central_wasm = match self.central_wasm(file, &origin, spec, &typed) {
            Ok(c) => c,
            Err(()) => return,
        };
        let inner_type_url = typed.any.type_url.clone();
        let tec = TypedExtensionConfig { name: spec.name.clone(), typed_config: Some(typed.any) };
        self.resources.push(Arc::new(CompiledResource {
            resource_type: rt,
            name: spec.name.clone(),
            selector: spec.node_selector.clone(),
            resource: Any { type_url: rt.type_url().to_owned(), value: tec.encode_to_vec() },
            inner_type_url,
            version,
            origin,
            placement,
            listener_json: None,
            wasm_sha256: None,
            envoy_fetches_code: false,
            central_wasm,
            central_shas: Vec::new(),
            rollout: spec.rollout.clone().or_else(|| self.rollout.clone()),
        }));
    }

    fn wasm_plugin(&mut self, file: &ParsedFile, i: usize, spec: &WasmPluginSpec) {
        let at = format!("wasm_plugins[{i}]");
        let origin = Origin {
            file: file.path.clone(),
            line: file.lines.line_of(&at).into(),
            path: file.lines.original_path(&at),
        };
        let ok = self.register(
            ResourceType::ExtensionConfig,
            "wasm plugin",
            "name",
            &spec.name,
            &spec.node_selector,
            &origin,
        );
        let base = crate::parsed::config_dir(&file.path);
        let mut plugin = match WasmPlugin::from_spec(spec, base, origin.clone()) {
            Ok(p) => p,
            Err((sub, message)) => {
                self.error_at(&origin, &sub, message);
                return;
            }
        };
        plugin.rollout = spec.rollout.clone().or_else(|| self.rollout.clone());
        plugin.verification = match &spec.verification {
            Some(v) => match self.plugin_verification(base, v) {
                Ok(v) => Some(v),
                Err((sub, message)) => {
                    self.error_at(&origin, &sub, message);
                    return;
                }
            },
            None => self.verification.clone(),
        };
        if let Some(Err(m)) = spec.rollout.as_ref().map(check_rollout) {
            self.error_at(&origin, "rollout", m);
        }
        if let Some(p) = &spec.placement {
            match self.placement(&origin, &spec.name, plugin.type_url(), p) {
                Some(p) => plugin.placement = Some(Arc::new(p)),
                None => return,
            }
        }
        if ok {
            self.wasm.push(plugin);
        }
    }
}

mod placed;
mod resources;

pub use placed::assemble_listener;
pub use resources::envoy_entry;

/// A public key file, read (small) and checked to hold a PEM public key: (its path as
/// written, its text).
fn read_key(base: &std::path::Path, path: &std::path::Path) -> Result<(String, String), String> {
    let full = if path.is_absolute() { path.to_path_buf() } else { base.join(path) };
    let bytes = filterplane_api::files::read_small_file(&full, 64 * 1024)
        .map_err(|e| format!("cannot read {}: {e}", full.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{}: not PEM text", full.display()))?;
    check_pem(&text).map_err(|m| format!("{}: {m}", full.display()))?;
    Ok((path.display().to_string(), text))
}

/// Whether `text` holds a PEM public key block (its contents are checked when used).
fn check_pem(text: &str) -> Result<(), String> {
    if text.contains("-----BEGIN PUBLIC KEY-----") && text.contains("-----END PUBLIC KEY-----") {
        Ok(())
    } else if text.contains("PRIVATE KEY") {
        Err("a private key: give the public key (`openssl pkey -pubout`)".into())
    } else {
        Err("expected a -----BEGIN PUBLIC KEY----- block (ECDSA P-256, RSA or Ed25519)".into())
    }
}
