//! The README's contributor map agrees with the module list at the top of `src/lib.rs`.

use std::collections::BTreeSet;

use crate::support::{readme_section, repo_file};

/// The first backticked word of each `- ` line.
fn listed(lines: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    lines
        .into_iter()
        .filter_map(|l| {
            let item = l.strip_prefix("- ")?;
            let name = item.split('`').nth(1)?;
            Some(name.to_owned())
        })
        .collect()
}

#[test]
fn where_to_change_what_names_every_module_of_lib_rs() {
    let lib = repo_file("src/lib.rs");
    let modules = listed(
        lib.lines()
            .map_while(|l| l.strip_prefix("//!"))
            .map(|l| l.trim_start().to_owned()),
    );
    assert!(
        modules.len() > 5,
        "src/lib.rs's //! header lists too few modules: {modules:?}"
    );
    let readme = listed(readme_section("Where to change what"));
    assert_eq!(
        readme, modules,
        "README's \"Where to change what\" and src/lib.rs's module list differ; update the one \
         that is behind"
    );
}

#[test]
fn the_readme_limits_example_is_a_valid_limits_table() {
    #[derive(serde::Deserialize)]
    struct File {
        limits: hubgate::limits::LimitsFile,
    }
    let section = readme_section("Fair use: limits per user and per client").join("\n");
    let start = section
        .find("```toml\n")
        .expect("a toml example in the README's limits section")
        + "```toml\n".len();
    let end = start + section[start..].find("```").expect("the example's end");
    let file: File = toml::from_str(&section[start..end]).unwrap_or_else(|e| panic!("{e}"));
    let settings = hubgate::limits::Settings::from_file(&file.limits);
    assert!(matches!(settings, Ok(Some(_))), "{settings:?}");
}
