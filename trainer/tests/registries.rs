//! The config crate's registry lists (what `vissl config validate` and the operator accept, and what
//! `vissl list` prints) must name exactly what the trainer can build.

use vissl_crds::registry::{names, Kind};
use vissl_trainer::{data, engine, losses, models, optim};

fn sorted(mut v: Vec<&'static str>) -> Vec<&'static str> {
    v.sort_unstable();
    v
}

fn assert_same(kind: Kind, trainer: Vec<&'static str>) {
    assert_eq!(
        sorted(names(kind).to_vec()),
        sorted(trainer),
        "registry `{}` in vissl-crds differs from the trainer's table",
        kind.as_str()
    );
}

#[test]
fn every_registered_name_has_a_constructor_and_vice_versa() {
    assert_same(Kind::Losses, losses::known_losses());
    assert_same(Kind::Trunks, models::trunks::trunk_names());
    assert_same(Kind::Heads, models::heads::head_names());
    assert_same(Kind::Transforms, data::transforms::names());
    assert_same(Kind::Collators, data::collators::names());
    assert_same(Kind::DataSources, data::sources::names());
    assert_same(Kind::Optimizers, optim::known_optimizers());
    assert_same(Kind::Meters, engine::meters::names());
    assert_same(Kind::Hooks, engine::hooks::names());
}
