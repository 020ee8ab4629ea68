//! docs/api.md describes every route the admin API serves, each under a heading that names
//! its method and path, and no route that it does not serve.

use drover_admin::routes::ROUTES;

#[test]
fn the_api_page_has_a_section_for_every_route_and_no_other() {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md"))
        .expect("docs/api.md exists");
    let headings: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("### "))
        .filter_map(|l| l.rsplit_once(": `").map(|(_, r)| r.trim_end_matches('`')))
        .collect();
    for (method, path, _) in ROUTES {
        let wanted = format!("{method} {path}");
        assert!(
            headings.contains(&wanted.as_str()),
            "docs/api.md has no section for {wanted}"
        );
    }
    assert_eq!(
        headings.len(),
        ROUTES.len(),
        "sections for routes that do not exist: {headings:?}"
    );
}
