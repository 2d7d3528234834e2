//! Command-line arguments in Hydra's override syntax, as VISSL's docs show them:
//! `config=<file>`, `config.A.B=value`, `+config.NEW=value`, `++config.A=value`,
//! `+config/<group>=<file>`, and `hydra.*` settings (accepted and ignored: they configure Hydra).

use serde_yaml::Value;

use super::error::ConfigError;
use super::tree::KeyPath;

/// How a dotted override treats a key that does or does not exist (Hydra's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetMode {
    /// `key=value`: the key must exist.
    Assign,
    /// `+key=value`: the key must not exist yet.
    Add,
    /// `++key=value`: set whether or not it exists.
    Force,
}

/// One parsed command-line argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Override {
    /// `config=pretrain/simclr/simclr_8node_resnet`: the main config file.
    Primary { arg: String, name: String },
    /// `+config/pretrain/swav/optimization=my_opt`: a component file merged after the main one.
    Component {
        arg: String,
        group: String,
        name: String,
    },
    /// `config.A.B=value` and its `+` / `++` forms.
    Set {
        arg: String,
        path: KeyPath,
        value: Value,
        mode: SetMode,
    },
    /// `hydra.verbose=true`: a setting of Hydra itself, which has no counterpart here.
    Hydra { arg: String },
}

/// Parses one argument.
pub fn parse(arg: &str) -> Result<Override, ConfigError> {
    let bad = |reason: String| ConfigError::BadOverride {
        arg: arg.to_string(),
        reason,
    };
    if arg.starts_with('~') {
        return Err(bad("deleting keys (`~key`) is not supported: a config must keep every key of defaults.yaml".into()));
    }
    if arg.starts_with('-') {
        return Err(bad(
            "expected `key=value`; Hydra's command-line flags are not supported".into(),
        ));
    }
    let Some((raw_key, raw_value)) = arg.split_once('=') else {
        return Err(bad(
            "expected `key=value` (for example `config.OPTIMIZER.num_epochs=10`)".into(),
        ));
    };
    let (mode, key) = if let Some(k) = raw_key.strip_prefix("++") {
        (SetMode::Force, k)
    } else if let Some(k) = raw_key.strip_prefix('+') {
        (SetMode::Add, k)
    } else {
        (SetMode::Assign, raw_key)
    };
    if key.is_empty() {
        return Err(bad("the key is empty".into()));
    }
    if key == "config" {
        let name = raw_value.trim();
        if name.is_empty() {
            return Err(bad(
                "`config=` needs a config file, e.g. `config=pretrain/simclr/simclr_8node_resnet`"
                    .into(),
            ));
        }
        return Ok(Override::Primary {
            arg: arg.to_string(),
            name: name.to_string(),
        });
    }
    if let Some(group) = key.strip_prefix("config/") {
        if mode == SetMode::Assign {
            return Err(bad(format!(
                "a config component is added with a leading `+`: `+{key}={raw_value}` (Hydra's rule)"
            )));
        }
        let group = group.trim_matches('/');
        let name = raw_value.trim();
        if group.is_empty() || name.is_empty() {
            return Err(bad("expected `+config/<group folder>=<file>`".into()));
        }
        return Ok(Override::Component {
            arg: arg.to_string(),
            group: group.to_string(),
            name: name.to_string(),
        });
    }
    if key == "hydra" || key.starts_with("hydra.") {
        return Ok(Override::Hydra {
            arg: arg.to_string(),
        });
    }
    let path = KeyPath::parse(key).map_err(bad)?;
    let value = parse_value(raw_value).map_err(bad)?;
    Ok(Override::Set {
        arg: arg.to_string(),
        path,
        value,
        mode,
    })
}

/// A value typed as YAML would type it (`true`, `0.1`, `[a,b]`, `{k: v}`, `null`); Hydra's empty value is
/// the empty string, and text that YAML cannot read (but is not meant as a list or mapping) is a string.
pub fn parse_value(raw: &str) -> Result<Value, String> {
    if raw.is_empty() {
        return Ok(Value::String(String::new()));
    }
    if raw.starts_with('#') {
        return Ok(Value::String(raw.to_string()));
    }
    match serde_yaml::from_str::<Value>(raw) {
        Ok(value) => Ok(value),
        Err(e) if raw.starts_with(['[', '{', '"', '\'']) => {
            Err(format!("cannot read the value `{raw}`: {e}"))
        }
        Err(_) => Ok(Value::String(raw.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(arg: &str) -> (String, Value, SetMode) {
        match parse(arg).unwrap() {
            Override::Set {
                path, value, mode, ..
            } => (path.to_string(), value, mode),
            other => panic!("not a set: {other:?}"),
        }
    }

    #[test]
    fn values_are_typed_like_yaml() {
        assert_eq!(set("config.A=true").1, Value::Bool(true));
        assert_eq!(
            set("config.A=0.1").1,
            serde_yaml::from_str::<Value>("0.1").unwrap()
        );
        assert_eq!(
            set("config.A=[a,b]").1,
            serde_yaml::from_str::<Value>("[a, b]").unwrap()
        );
        assert_eq!(
            set("config.A={k: v}").1,
            serde_yaml::from_str::<Value>("k: v").unwrap()
        );
        assert_eq!(set("config.A=null").1, Value::Null);
        assert_eq!(set("config.A=").1, Value::from(""));
        assert_eq!(
            set("config.A=./checkpoints").1,
            Value::from("./checkpoints")
        );
        assert_eq!(
            set("config.A=s3://bucket/run-1").1,
            Value::from("s3://bucket/run-1")
        );
        assert_eq!(
            set("config.A=[/data/train]").1,
            serde_yaml::from_str::<Value>("['/data/train']").unwrap()
        );
        assert_eq!(set("config.A=a=b").1, Value::from("a=b"));
    }

    #[test]
    fn prefixes_select_the_mode() {
        assert_eq!(set("config.A.B=1").2, SetMode::Assign);
        assert_eq!(set("+config.A.B=1").2, SetMode::Add);
        assert_eq!(set("++config.A.B=1").2, SetMode::Force);
        assert_eq!(set("engine_name=extract_features").0, "engine_name");
    }

    #[test]
    fn config_files_and_components() {
        assert_eq!(
            parse("config=pretrain/simclr/simclr_8node_resnet").unwrap(),
            Override::Primary {
                arg: "config=pretrain/simclr/simclr_8node_resnet".into(),
                name: "pretrain/simclr/simclr_8node_resnet".into()
            }
        );
        match parse("+config/pretrain/swav/optimization=my_opt").unwrap() {
            Override::Component { group, name, .. } => {
                assert_eq!(group, "pretrain/swav/optimization");
                assert_eq!(name, "my_opt");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse("hydra.verbose=true").unwrap(),
            Override::Hydra { .. }
        ));
    }

    #[test]
    fn malformed_arguments_say_what_is_expected() {
        for (arg, needle) in [
            ("config.A", "expected `key=value`"),
            ("config/pretrain/swav/optimization=x", "leading `+`"),
            ("~config.A", "not supported"),
            ("config.A=[1, 2", "cannot read the value"),
            ("config=", "needs a config file"),
            ("config..A=1", "empty key"),
        ] {
            let err = parse(arg).unwrap_err().to_string();
            assert!(err.contains(needle), "{arg}: {err}");
            assert!(err.contains(arg), "{arg}: {err}");
        }
    }
}
