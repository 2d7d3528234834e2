//! Key paths into the YAML tree, the merge rule of composition, and where each value came from.

use std::collections::BTreeMap;
use std::fmt;

use serde_yaml::{Mapping, Value};

use super::error::Origin;

/// One step of a key path: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Seg {
    /// A mapping key.
    Key(String),
    /// A list position.
    Index(usize),
}

/// A path from the document root, displayed as users type it: `config.DATA.TRAIN.TRANSFORMS[2].name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyPath(Vec<Seg>);

impl KeyPath {
    /// Parses `a.b.c`, `a.b[2].c` and OmegaConf's `a.b.2.c` (a numeric key indexes a list when the
    /// node it meets is a list, see [`get`]).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut segs = Vec::new();
        for part in text.split('.') {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if key.is_empty() && (rest.is_empty() || segs.is_empty()) {
                return Err(format!("empty key in `{text}`"));
            }
            if !key.is_empty() {
                segs.push(Seg::Key(key.to_string()));
            }
            while !rest.is_empty() {
                let close = rest
                    .find(']')
                    .ok_or_else(|| format!("unclosed `[` in `{text}`"))?;
                let index = rest[1..close]
                    .parse::<usize>()
                    .map_err(|_| format!("bad list index in `{text}`"))?;
                segs.push(Seg::Index(index));
                rest = &rest[close + 1..];
                if !rest.is_empty() && !rest.starts_with('[') {
                    return Err(format!("unexpected `{rest}` after `]` in `{text}`"));
                }
            }
        }
        Ok(KeyPath(segs))
    }

    /// The steps of the path.
    pub fn segs(&self) -> &[Seg] {
        &self.0
    }

    /// This path extended by a mapping key.
    pub fn key(&self, key: &str) -> KeyPath {
        let mut next = self.clone();
        next.0.push(Seg::Key(key.to_string()));
        next
    }

    /// This path extended by a list index.
    pub fn index(&self, index: usize) -> KeyPath {
        let mut next = self.clone();
        next.0.push(Seg::Index(index));
        next
    }

    /// Whether `self` equals `other` or lies below it.
    pub fn starts_with(&self, other: &KeyPath) -> bool {
        self.0.starts_with(&other.0)
    }

    /// The path without its last step (the root stays the root).
    pub fn parent(&self) -> KeyPath {
        let mut parent = self.clone();
        parent.0.pop();
        parent
    }

    /// The last mapping key of the path, if it ends in one.
    pub fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Seg::Key(k)) => Some(k),
            _ => None,
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// The node at `path`, if there is one. A numeric key indexes a list.
pub fn get<'a>(mut node: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    for seg in path {
        node = match (seg, node) {
            (Seg::Key(k), Value::Mapping(m)) => m.get(k.as_str())?,
            (Seg::Key(k), Value::Sequence(s)) => s.get(k.parse::<usize>().ok()?)?,
            (Seg::Index(i), Value::Sequence(s)) => s.get(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

/// The node at `path` for modification, if there is one. A numeric key indexes a list.
pub fn get_mut<'a>(mut node: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    for seg in path {
        node = match (seg, node) {
            (Seg::Key(k), Value::Mapping(m)) => m.get_mut(k.as_str())?,
            (Seg::Key(k), Value::Sequence(s)) => s.get_mut(k.parse::<usize>().ok()?)?,
            (Seg::Index(i), Value::Sequence(s)) => s.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(node)
}

/// OmegaConf's merge: mappings merge key by key (new keys are appended), anything else replaces.
pub fn deep_merge(dst: &mut Value, src: Value) {
    match (dst, src) {
        (Value::Mapping(dst), Value::Mapping(src)) => {
            for (key, value) in src {
                match dst.get_mut(&key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        dst.insert(key, value);
                    }
                }
            }
        }
        (dst, src) => *dst = src,
    }
}

/// `path` with numeric keys that address list items turned into indices, as far as the tree goes.
pub fn normalize(root: &Value, path: &KeyPath) -> KeyPath {
    let mut node = Some(root);
    let mut out = KeyPath::default();
    for seg in path.segs() {
        let seg = match (seg, node) {
            (Seg::Key(k), Some(Value::Sequence(_))) => {
                k.parse::<usize>().map_or(seg.clone(), Seg::Index)
            }
            _ => seg.clone(),
        };
        node = node.and_then(|n| get(n, std::slice::from_ref(&seg)));
        out.0.push(seg);
    }
    out
}

/// Removes and returns the node at `path` (a mapping entry), if there is one.
pub fn take(root: &mut Value, path: &[Seg]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let Seg::Key(key) = last else { return None };
    match get_mut(root, parents)? {
        Value::Mapping(m) => m.remove(key.as_str()),
        _ => None,
    }
}

/// Merges `value` into the node at `path`, creating missing mappings on the way (list items must
/// exist). Fails (returning the value back) when a node on the way cannot hold the next step.
pub fn merge_at(root: &mut Value, path: &[Seg], value: Value) -> Result<(), Value> {
    let mut node = root;
    for seg in path {
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
        node = match (seg, node) {
            (Seg::Key(key), Value::Mapping(map)) => {
                map.entry(Value::String(key.clone())).or_insert(Value::Null)
            }
            (Seg::Index(i), Value::Sequence(items)) => match items.get_mut(*i) {
                Some(item) => item,
                None => return Err(value),
            },
            _ => return Err(value),
        };
    }
    if node.is_null() {
        *node = value;
    } else {
        deep_merge(node, value);
    }
    Ok(())
}

/// A mapping key as text, for paths and messages.
pub fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => scalar_text(other),
    }
}

/// A short rendering of a value for messages.
pub fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "null".to_string(),
        other => {
            let text = serde_yaml::to_string(other).unwrap_or_default();
            let text = text.trim().replace('\n', " ");
            if text.len() > 60 {
                format!(
                    "{}...",
                    &text[..text.char_indices().nth(57).map_or(text.len(), |(i, _)| i)]
                )
            } else {
                text
            }
        }
    }
}

/// The kind of a value, as error messages name it ("a string", "an integer", ...).
pub fn kind_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Which source last set each part of the tree, so errors can name the file or argument.
#[derive(Debug, Clone, Default)]
pub struct Origins(BTreeMap<KeyPath, Origin>);

impl Origins {
    /// Records `origin` for `at` and every node below it in `value`.
    pub fn record(&mut self, at: &KeyPath, value: &Value, origin: &Origin) {
        self.0.insert(at.clone(), origin.clone());
        if let Value::Mapping(map) = value {
            for (key, child) in map {
                self.record(&at.key(&key_text(key)), child, origin);
            }
        }
    }

    /// The origin of the deepest recorded node on `path` (the defaults when none).
    pub fn of(&self, path: &KeyPath) -> Origin {
        let mut probe = path.clone();
        loop {
            if let Some(origin) = self.0.get(&probe) {
                return origin.clone();
            }
            if probe.segs().is_empty() {
                return Origin::Inferred;
            }
            probe = probe.parent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).expect("test yaml")
    }

    #[test]
    fn paths_parse_and_display_in_both_index_spellings() {
        let p = KeyPath::parse("config.DATA.TRAIN.TRANSFORMS[2].name").unwrap();
        assert_eq!(p.to_string(), "config.DATA.TRAIN.TRANSFORMS[2].name");
        let tree = yaml("config: {DATA: {TRAIN: {TRANSFORMS: [{name: a}, {name: b}, {name: c}]}}}");
        assert_eq!(get(&tree, p.segs()), Some(&Value::from("c")));
        let dotted = KeyPath::parse("config.DATA.TRAIN.TRANSFORMS.1.name").unwrap();
        assert_eq!(get(&tree, dotted.segs()), Some(&Value::from("b")));
        assert_eq!(
            normalize(&tree, &dotted).to_string(),
            "config.DATA.TRAIN.TRANSFORMS[1].name"
        );
        assert!(KeyPath::parse("a..b").is_err());
        assert!(KeyPath::parse("a[x]").is_err());
    }

    #[test]
    fn merge_replaces_lists_and_merges_mappings() {
        let mut dst = yaml("a: {b: 1, c: [1, 2]}\nd: x");
        deep_merge(&mut dst, yaml("a: {c: [3], e: true}"));
        assert_eq!(dst, yaml("a: {b: 1, c: [3], e: true}\nd: x"));
    }

    #[test]
    fn merge_at_creates_intermediate_mappings() {
        let mut root = yaml("a: {b: 1}");
        merge_at(
            &mut root,
            KeyPath::parse("a.x.y").unwrap().segs(),
            Value::from(2),
        )
        .unwrap();
        assert_eq!(root, yaml("a: {b: 1, x: {y: 2}}"));
        assert!(merge_at(
            &mut root,
            KeyPath::parse("a.b.z").unwrap().segs(),
            Value::from(3)
        )
        .is_err());
        let mut listed = yaml("l: [{a: 1}]");
        let at = |p: &str| KeyPath::parse(p).unwrap();
        merge_at(&mut listed, at("l[0].b").segs(), Value::from(2)).unwrap();
        assert_eq!(listed, yaml("l: [{a: 1, b: 2}]"));
        assert!(merge_at(&mut listed, at("l[1].b").segs(), Value::from(2)).is_err());
    }

    #[test]
    fn origins_resolve_to_the_deepest_recorded_node() {
        let mut origins = Origins::default();
        let file = Origin::File("f.yaml".into());
        let cli = Origin::CommandLine("config.A.B=1".into());
        origins.record(
            &KeyPath::parse("config").unwrap(),
            &yaml("A: {B: 0, C: 0}"),
            &file,
        );
        origins.record(
            &KeyPath::parse("config.A.B").unwrap(),
            &Value::from(1),
            &cli,
        );
        assert_eq!(origins.of(&KeyPath::parse("config.A.B").unwrap()), cli);
        assert_eq!(origins.of(&KeyPath::parse("config.A.C").unwrap()), file);
        assert_eq!(origins.of(&KeyPath::parse("config.A.C.D").unwrap()), file);
    }
}
