//! A directory of a unit test's own, removed on drop (panic included).

use std::path::PathBuf;

/// `$TMPDIR/tollgate-<scope>-<tag>-<pid>`, emptied when made and removed on drop; the scope
/// (the module) keeps two modules' tags apart in one test process.
pub(crate) struct Dir(pub PathBuf);

impl Dir {
    pub(crate) fn new(scope: &str, tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("tollgate-{scope}-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("a test directory");
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
