//! Runs the README's five-minute walkthrough exactly as written against the no-Docker stack
//! (`scripts/stack`), and checks each block's output against the output the README shows after it.

mod readme;

use readme::Stack;

#[tokio::test]
async fn the_readme_walkthrough_works_as_written_against_the_local_stack() {
    let steps = readme::readme_section("walkthrough");
    assert!(steps.len() >= 5, "the walkthrough has its steps");
    let stack = Stack::start().await;

    stack.run_and_check(&steps, None, "the walkthrough").await;
}

#[test]
fn the_readme_matcher_treats_an_ellipsis_as_any_text() {
    assert!(readme::matches("a…c", "abbbc"));
    assert!(readme::matches(
        "{\"x\":\"…\",\"y\":1}",
        "{\"x\":\"2026\",\"y\":1}"
    ));
    assert!(!readme::matches("a…c", "abd"));
    assert!(!readme::matches("200\n200", "200"));
    assert!(readme::matches("exact", "exact"));
}

#[test]
fn a_section_is_its_sh_blocks_each_with_the_text_block_after_it() {
    let readme = "before\n```sh\nno\n```\n<!-- s:begin -->\n```sh\none\ntwo\n```\n\n```text\nout\n```\n\
                  text\n```sh\nthree\n```\n<!-- s:end -->\n```sh\nno\n```\n";

    let steps = readme::section_steps(readme, "s");

    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].commands, "one\ntwo");
    assert_eq!(steps[0].expected.as_deref(), Some("out"));
    assert_eq!(steps[1].commands, "three");
    assert_eq!(steps[1].expected, None);
}
