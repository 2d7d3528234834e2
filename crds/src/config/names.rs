//! Registry names in a config (losses, trunks, heads, transforms, ...) checked against
//! [`crate::registry`], plus the shape of the free-form lists that hold them.

use serde_yaml::Value;

use super::error::ConfigError;
use super::tree::{self, KeyPath};
use crate::registry::Kind;

/// Checks every registry name in the document; returns all problems in document order.
pub fn check_names(doc: &Value) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let config = KeyPath::default().key("config");
    let name_at = |kind: Kind, path: KeyPath, errors: &mut Vec<ConfigError>| {
        if let Some(Value::String(name)) = tree::get(doc, path.segs()) {
            if let Err(e) = kind.check(name, &path.to_string()) {
                errors.push(e);
            }
        }
    };

    name_at(Kind::Losses, config.key("LOSS").key("name"), &mut errors);
    name_at(
        Kind::Trunks,
        config.key("MODEL").key("TRUNK").key("NAME"),
        &mut errors,
    );
    name_at(
        Kind::Optimizers,
        config.key("OPTIMIZER").key("name"),
        &mut errors,
    );

    let meters = config.key("METERS");
    if !matches!(tree::get(doc, meters.key("name").segs()), Some(Value::String(s)) if s.is_empty())
    {
        name_at(Kind::Meters, meters.key("name"), &mut errors);
    }
    for path in list_items(doc, &meters.key("names")) {
        name_at(Kind::Meters, path, &mut errors);
    }

    for split in ["TRAIN", "TEST"] {
        let data = config.key("DATA").key(split);
        name_at(Kind::Collators, data.key("COLLATE_FUNCTION"), &mut errors);
        for list in ["DATA_SOURCES", "LABEL_SOURCES"] {
            for path in list_items(doc, &data.key(list)) {
                name_at(Kind::DataSources, path, &mut errors);
            }
        }
        for path in list_items(doc, &data.key("TRANSFORMS")) {
            match tree::get(doc, path.segs()) {
                Some(Value::Mapping(m)) if m.get("name").is_some_and(Value::is_string) => {
                    name_at(Kind::Transforms, path.key("name"), &mut errors)
                }
                _ => errors.push(ConfigError::Invalid {
                    path: path.to_string(),
                    reason: "a transform is a mapping with a `name` and its parameters, e.g. {name: RandomHorizontalFlip, p: 0.5}"
                        .into(),
                }),
            }
        }
    }

    let heads = config.key("MODEL").key("HEAD").key("PARAMS");
    check_heads(doc, &heads, &mut errors);

    let schedulers = config.key("OPTIMIZER").key("param_schedulers");
    if let Some(Value::Mapping(blocks)) = tree::get(doc, schedulers.segs()) {
        for key in blocks.keys() {
            check_scheduler(doc, &schedulers.key(&tree::key_text(key)), &mut errors);
        }
    }
    errors
}

/// Paths of the items of the list at `path` (none when it is not a list).
fn list_items(doc: &Value, path: &KeyPath) -> Vec<KeyPath> {
    match tree::get(doc, path.segs()) {
        Some(Value::Sequence(items)) => (0..items.len()).map(|i| path.index(i)).collect(),
        _ => Vec::new(),
    }
}

/// `MODEL.HEAD.PARAMS`: `[[name, {kwargs}], ...]` (one head made of a chain of modules, or one
/// module per evaluated feature) or `[[[name, {kwargs}], ...], ...]` (several heads).
fn check_heads(doc: &Value, params: &KeyPath, errors: &mut Vec<ConfigError>) {
    for entry in list_items(doc, params) {
        match tree::get(doc, entry.segs()) {
            Some(Value::Sequence(items))
                if items.iter().all(Value::is_sequence) && !items.is_empty() =>
            {
                for module in list_items(doc, &entry) {
                    check_head_module(doc, &module, errors);
                }
            }
            _ => check_head_module(doc, &entry, errors),
        }
    }
}

fn check_head_module(doc: &Value, path: &KeyPath, errors: &mut Vec<ConfigError>) {
    match tree::get(doc, path.segs()) {
        Some(Value::Sequence(pair)) if pair.len() == 2 && pair[1].is_mapping() => match &pair[0] {
            Value::String(name) => {
                if let Err(e) = Kind::Heads.check(name, &path.index(0).to_string()) {
                    errors.push(e);
                }
            }
            other => errors.push(ConfigError::Invalid {
                path: path.index(0).to_string(),
                reason: format!(
                    "a head name must be a string, found {}",
                    tree::kind_name(other)
                ),
            }),
        },
        _ => errors.push(ConfigError::Invalid {
            path: path.to_string(),
            reason:
                "a head module is a pair [name, {kwargs}], e.g. [\"mlp\", {\"dims\": [2048, 128]}]"
                    .into(),
        }),
    }
}

fn check_scheduler(doc: &Value, block: &KeyPath, errors: &mut Vec<ConfigError>) {
    if let Some(Value::String(name)) = tree::get(doc, block.key("name").segs()) {
        if let Err(e) = Kind::Schedulers.check(name, &block.key("name").to_string()) {
            errors.push(e);
        }
    }
    for sub in list_items(doc, &block.key("schedulers")) {
        check_scheduler(doc, &sub, errors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(yaml: &str) -> Vec<String> {
        let doc: Value = serde_yaml::from_str(yaml).unwrap();
        check_names(&doc).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn head_shapes_single_chain_and_multiple_heads() {
        assert!(errors_of(
            "config: {MODEL: {HEAD: {PARAMS: [[mlp, {dims: [2, 2]}], [identity, {}]]}}}"
        )
        .is_empty());
        assert!(errors_of(
            "config: {MODEL: {HEAD: {PARAMS: [[[mlp, {}]], [[eval_mlp, {}], [mlp, {}]]]}}}"
        )
        .is_empty());
        let errs =
            errors_of("config: {MODEL: {HEAD: {PARAMS: [[[mlp, {}]], [[no_such_head, {}]]]}}}");
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].contains("unknown head `no_such_head` at `config.MODEL.HEAD.PARAMS[1][0][0]`"),
            "{errs:?}"
        );
        let errs = errors_of("config: {MODEL: {HEAD: {PARAMS: [[mlp]]}}}");
        assert!(errs[0].contains("pair [name, {kwargs}]"), "{errs:?}");
    }

    #[test]
    fn names_in_lists_and_nested_schedulers_are_checked() {
        let errs = errors_of(
            "config: {DATA: {TRAIN: {DATA_SOURCES: [disk_folder, disk_foldr], TRANSFORMS: [{name: ToTensor}, {p: 1}]}},
                      OPTIMIZER: {param_schedulers: {lr: {name: composite, schedulers: [{name: linear}, {name: cosin}]}}}}",
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs[0].contains("`config.DATA.TRAIN.DATA_SOURCES[1]`")
                && errs[0].contains("`disk_folder`")
        );
        assert!(errs[1].contains("config.DATA.TRAIN.TRANSFORMS[1]") && errs[1].contains("`name`"));
        assert!(errs[2].contains("config.OPTIMIZER.param_schedulers.lr.schedulers[1].name"));
        assert!(errs[2].contains("did you mean `cosine`?"));
    }

    #[test]
    fn empty_meter_name_means_no_meter() {
        assert!(errors_of("config: {METERS: {name: '', names: []}}").is_empty());
        let errs = errors_of(
            "config: {METERS: {name: '', names: [accuracy_list_meter, mean_ap_list_meter]}}",
        );
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].contains("known meter names: accuracy_list_meter"),
            "{errs:?}"
        );
    }
}
