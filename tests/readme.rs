//! The README's promises that a test can hold: its settings table is pool-core's settings
//! table (names, environment variables, defaults), row for row.

use resilient_diesel::pool_core::settings::SETTINGS;

#[test]
fn the_readme_settings_table_is_the_settings_table() {
    let readme = include_str!("../README.md");
    let section = &readme[readme.find("## Settings").expect("a Settings section")..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let rows: Vec<Vec<String>> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect()
        })
        .collect();
    assert_eq!(rows.len(), SETTINGS.len(), "one README row per setting");
    for (row, setting) in rows.iter().zip(SETTINGS) {
        assert_eq!(row[0], setting.name);
        assert_eq!(row[1], setting.env.unwrap_or("—"), "{}", setting.name);
        assert_eq!(row[2], setting.default, "{}", setting.name);
    }
}
