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
