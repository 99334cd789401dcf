//! kilnd's records, in SQLite (`<state-dir>/kilnd.db`): templates and the names that point at
//! them (with their pool settings), and every sandbox with its VMM's pid, so a restarted daemon
//! knows each one and can adopt it or clean up after it.

use std::cell::Cell;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::types::{SandboxState, TemplateInfo};

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("kilnd's database: {0}")]
pub struct DbError(#[from] rusqlite::Error);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS templates (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    built_at INTEGER NOT NULL,
    disk_bytes INTEGER NOT NULL,
    kind TEXT NOT NULL DEFAULT 'build'
);
CREATE TABLE IF NOT EXISTS template_names (
    name TEXT PRIMARY KEY,
    template_id TEXT NOT NULL REFERENCES templates(id),
    min_ready INTEGER NOT NULL DEFAULT 0,
    max_sandboxes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    template_id TEXT NOT NULL,
    template_name TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    env_json TEXT NOT NULL,
    metadata_json TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    mem_mib INTEGER NOT NULL,
    exec_count INTEGER NOT NULL DEFAULT 0,
    vmm_pid INTEGER,
    vmm_start INTEGER,
    dir TEXT NOT NULL,
    memory_from TEXT NOT NULL,
    network_json TEXT NOT NULL DEFAULT ''
);
";

/// Columns added since the first schema (table, column), each with what adds it to an older
/// database.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    (
        "sandboxes",
        "network_json",
        "ALTER TABLE sandboxes ADD COLUMN network_json TEXT NOT NULL DEFAULT ''",
    ),
    (
        "templates",
        "kind",
        "ALTER TABLE templates ADD COLUMN kind TEXT NOT NULL DEFAULT 'build'",
    ),
];

/// A template's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRow {
    /// Content key.
    pub id: String,
    /// The name it was built under.
    pub name: String,
    /// Its spec, as JSON.
    pub spec_json: String,
    /// Seconds since the epoch.
    pub built_at: u64,
    /// Root image size.
    pub disk_bytes: u64,
    /// `build` (made from a spec) or `snapshot` (taken from a running sandbox).
    pub kind: String,
}

/// A sandbox's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRow {
    /// Its id.
    pub id: String,
    /// The template's content key.
    pub template_id: String,
    /// The template's name.
    pub template_name: String,
    /// `running`, `paused` or `warm` (a pooled VM not handed out yet).
    pub state: String,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Seconds since the epoch.
    pub expires_at: u64,
    /// Its own environment, JSON.
    pub env_json: String,
    /// Its labels, JSON.
    pub metadata_json: String,
    /// vCPUs.
    pub vcpus: u32,
    /// MiB.
    pub mem_mib: u32,
    /// Commands run.
    pub exec_count: u64,
    /// The VMM's pid while it runs.
    pub vmm_pid: Option<u32>,
    /// The VMM's start time (clock ticks after boot), so a reused pid is not taken for it.
    pub vmm_start: Option<u64>,
    /// Its folder.
    pub dir: String,
    /// The folder whose snapshot its memory maps (a template's, a fork's, or its own pause).
    pub memory_from: String,
    /// Its network (`crate::net::NetRecord`), JSON; empty for a warm VM and for records older
    /// than networks (no interface, no policy).
    pub network_json: String,
}

/// The connection.
pub struct Db {
    conn: Connection,
    /// Moves on every write to the templates or their names: what was read of them before is
    /// stale once it has moved (see [`Db::templates_version`]).
    templates_version: Cell<u64>,
}

impl Db {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        for (table, column, add) in ADDED_COLUMNS {
            let probe = format!("SELECT {column} FROM {table} LIMIT 0");
            if conn.prepare(&probe).is_err() {
                conn.execute_batch(add)?;
            }
        }
        Ok(Db {
            conn,
            templates_version: Cell::new(0),
        })
    }

    /// Records a built template under `row.name` (the name now points at it).
    pub fn put_template(&self, row: &TemplateRow) -> Result<(), DbError> {
        self.templates_changed();
        self.conn.execute(
            "INSERT OR REPLACE INTO templates (id, name, spec_json, built_at, disk_bytes, kind)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                row.id,
                row.name,
                row.spec_json,
                row.built_at as i64,
                row.disk_bytes as i64,
                row.kind
            ],
        )?;
        self.conn.execute(
            "INSERT INTO template_names (name, template_id) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET template_id = excluded.template_id",
            params![row.name, row.id],
        )?;
        Ok(())
    }

    /// A number that moves whenever this connection writes templates or their names (kilnd is
    /// their only writer): what was read of them at another number may be stale.
    pub fn templates_version(&self) -> u64 {
        self.templates_version.get()
    }

    /// Marks what was read of the templates as stale (called before the write, so a write that
    /// fails half-way is covered too).
    fn templates_changed(&self) {
        self.templates_version
            .set(self.templates_version.get().wrapping_add(1));
    }

    /// The template a name points at, or the template with that id.
    pub fn template(&self, name_or_id: &str) -> Result<Option<(TemplateRow, u32, u32)>, DbError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT t.id, t.name, t.spec_json, t.built_at, t.disk_bytes,
                        COALESCE(n.min_ready, 0), COALESCE(n.max_sandboxes, 0), t.kind
                 FROM templates t LEFT JOIN template_names n ON n.template_id = t.id
                 WHERE n.name = ?1 OR t.id = ?1 LIMIT 1",
            )?
            .query_row(params![name_or_id], |r| {
                Ok((
                    TemplateRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        spec_json: r.get(2)?,
                        built_at: r.get::<_, i64>(3)? as u64,
                        disk_bytes: r.get::<_, i64>(4)? as u64,
                        kind: r.get(7)?,
                    },
                    r.get(5)?,
                    r.get(6)?,
                ))
            })
            .optional()?)
    }

    /// Every named template with its pool settings.
    pub fn templates(&self) -> Result<Vec<TemplateInfo>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT n.name, t.id, t.built_at, t.spec_json, t.disk_bytes, n.min_ready, n.max_sandboxes,
                    t.kind
             FROM template_names n JOIN templates t ON t.id = n.template_id ORDER BY n.name",
        )?;
        let rows = st.query_map([], |r| {
            let spec: serde_json::Value =
                serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default();
            Ok(TemplateInfo {
                name: r.get(0)?,
                id: r.get(1)?,
                built_at: r.get::<_, i64>(2)? as u64,
                vcpus: spec["vcpus"].as_u64().unwrap_or(1) as u32,
                mem_mib: spec["mem_mib"].as_u64().unwrap_or(0) as u32,
                disk_mib: r.get::<_, i64>(4)? as u64 >> 20,
                min_ready: r.get(5)?,
                max_sandboxes: r.get(6)?,
                ready: 0,
                kind: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets a named template's pool; false when the name is unknown.
    pub fn set_pool(
        &self,
        name: &str,
        min_ready: u32,
        max_sandboxes: u32,
    ) -> Result<bool, DbError> {
        self.templates_changed();
        Ok(self.conn.execute(
            "UPDATE template_names SET min_ready = ?2, max_sandboxes = ?3 WHERE name = ?1",
            params![name, min_ready, max_sandboxes],
        )? == 1)
    }

    /// Forgets a template name; the template's record goes too when no name points at it any
    /// more. Returns the removed template id, if one was.
    pub fn remove_template_name(&self, name: &str) -> Result<Option<String>, DbError> {
        self.templates_changed();
        let id: Option<String> = self
            .conn
            .query_row(
                "SELECT template_id FROM template_names WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else { return Ok(None) };
        self.conn
            .execute("DELETE FROM template_names WHERE name = ?1", params![name])?;
        let still: u32 = self.conn.query_row(
            "SELECT COUNT(*) FROM template_names WHERE template_id = ?1",
            params![id],
            |r| r.get(0),
        )?;
        if still == 0 {
            self.conn
                .execute("DELETE FROM templates WHERE id = ?1", params![id])?;
            return Ok(Some(id));
        }
        Ok(None)
    }

    /// Removes snapshot template `id`'s record when no name points at it any more (its name
    /// went to a newer snapshot); true when it went. Built templates stay: their folders are a
    /// cache found again by content key.
    pub fn forget_unnamed_snapshot(&self, id: &str) -> Result<bool, DbError> {
        self.templates_changed();
        let gone = self.conn.execute(
            "DELETE FROM templates WHERE id = ?1 AND kind = 'snapshot'
             AND NOT EXISTS (SELECT 1 FROM template_names WHERE template_id = ?1)",
            params![id],
        )?;
        Ok(gone > 0)
    }

    /// Writes (inserts or replaces) a sandbox's record.
    pub fn put_sandbox(&self, s: &SandboxRow) -> Result<(), DbError> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO sandboxes (id, template_id, template_name, state,
                    created_at, expires_at, env_json, metadata_json, vcpus, mem_mib, exec_count,
                    vmm_pid, vmm_start, dir, memory_from, network_json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                s.id,
                s.template_id,
                s.template_name,
                s.state,
                s.created_at as i64,
                s.expires_at as i64,
                s.env_json,
                s.metadata_json,
                s.vcpus,
                s.mem_mib,
                s.exec_count as i64,
                s.vmm_pid,
                s.vmm_start.map(|v| v as i64),
                s.dir,
                s.memory_from,
                s.network_json
            ])?;
        Ok(())
    }

    /// Every sandbox record.
    pub fn sandboxes(&self) -> Result<Vec<SandboxRow>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT id, template_id, template_name, state, created_at, expires_at, env_json,
                    metadata_json, vcpus, mem_mib, exec_count, vmm_pid, vmm_start, dir, memory_from,
                    network_json
             FROM sandboxes ORDER BY created_at, id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(SandboxRow {
                id: r.get(0)?,
                template_id: r.get(1)?,
                template_name: r.get(2)?,
                state: r.get(3)?,
                created_at: r.get::<_, i64>(4)? as u64,
                expires_at: r.get::<_, i64>(5)? as u64,
                env_json: r.get(6)?,
                metadata_json: r.get(7)?,
                vcpus: r.get(8)?,
                mem_mib: r.get(9)?,
                exec_count: r.get::<_, i64>(10)? as u64,
                vmm_pid: r.get(11)?,
                vmm_start: r.get::<_, Option<i64>>(12)?.map(|v| v as u64),
                dir: r.get(13)?,
                memory_from: r.get(14)?,
                network_json: r.get(15)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a sandbox.
    pub fn remove_sandbox(&self, id: &str) -> Result<(), DbError> {
        self.conn
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// How many sandboxes (not warm VMs) map their memory from `dir`.
    pub fn memory_users(&self, dir: &str) -> Result<u32, DbError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM sandboxes WHERE memory_from = ?1",
            params![dir],
            |r| r.get(0),
        )?)
    }
}

/// The state names stored for sandboxes handed out.
pub fn state_name(s: SandboxState) -> &'static str {
    s.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            template_id: "t1".into(),
            template_name: "py".into(),
            state: "running".into(),
            created_at: 1,
            expires_at: 2,
            env_json: "{}".into(),
            metadata_json: "{}".into(),
            vcpus: 1,
            mem_mib: 256,
            exec_count: 0,
            vmm_pid: Some(42),
            vmm_start: Some(7),
            dir: format!("/s/{id}"),
            memory_from: "/t/t1".into(),
            network_json: format!(r#"{{"nic":true,"publish":[{{"guest_port":80}}],"id":"{id}"}}"#),
        }
    }

    #[test]
    fn records_survive_a_reopen() {
        let dir = std::env::temp_dir().join(format!("kiln-db-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kilnd.db");
        {
            let db = Db::open(&path).unwrap();
            db.put_template(&TemplateRow {
                id: "t1".into(),
                name: "py".into(),
                spec_json: r#"{"vcpus":2,"mem_mib":512}"#.into(),
                built_at: 5,
                disk_bytes: 64 << 20,
                kind: "build".into(),
            })
            .unwrap();
            assert!(db.set_pool("py", 3, 10).unwrap());
            assert!(!db.set_pool("nope", 1, 1).unwrap());
            db.put_sandbox(&row("a")).unwrap();
            db.put_sandbox(&row("b")).unwrap();
        }
        let db = Db::open(&path).unwrap();
        let (t, min, max) = db.template("py").unwrap().unwrap();
        assert_eq!((t.id.as_str(), min, max), ("t1", 3, 10));
        assert!(db.template("t1").unwrap().is_some(), "found by id too");
        let list = db.templates().unwrap();
        assert_eq!(
            (list[0].vcpus, list[0].mem_mib, list[0].disk_mib),
            (2, 512, 64)
        );
        assert_eq!(db.sandboxes().unwrap().len(), 2);
        assert_eq!(
            db.sandboxes().unwrap()[0],
            row("a"),
            "every field comes back"
        );
        assert_eq!(db.memory_users("/t/t1").unwrap(), 2);
        db.remove_sandbox("a").unwrap();
        assert_eq!(db.sandboxes().unwrap()[0].id, "b");
        assert_eq!(
            db.remove_template_name("py").unwrap().as_deref(),
            Some("t1")
        );
        assert!(db.template("py").unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_template_write_moves_the_templates_version() {
        let dir = std::env::temp_dir().join(format!("kiln-db-ver-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::open(&dir.join("kilnd.db")).unwrap();
        let mut seen = vec![db.templates_version()];
        fn moved(db: &Db, seen: &mut Vec<u64>, what: &str) {
            let now = db.templates_version();
            assert!(!seen.contains(&now), "{what} left the version at {now}");
            seen.push(now);
        }
        let t = |id: &str, kind: &str| TemplateRow {
            id: id.into(),
            name: "py".into(),
            spec_json: "{}".into(),
            built_at: 1,
            disk_bytes: 0,
            kind: kind.into(),
        };
        db.put_template(&t("t1", "snapshot")).unwrap();
        moved(&db, &mut seen, "put_template");
        db.put_sandbox(&row("a")).unwrap();
        db.template("py").unwrap();
        db.remove_sandbox("a").unwrap();
        assert_eq!(
            db.templates_version(),
            *seen.last().unwrap(),
            "sandbox writes and template reads leave it"
        );
        db.put_template(&t("t2", "snapshot")).unwrap();
        moved(&db, &mut seen, "a rebuild under the same name");
        db.set_pool("py", 1, 2).unwrap();
        moved(&db, &mut seen, "set_pool");
        db.forget_unnamed_snapshot("t1").unwrap();
        moved(&db, &mut seen, "forget_unnamed_snapshot");
        db.remove_template_name("py").unwrap();
        moved(&db, &mut seen, "remove_template_name");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_database_from_before_networks_gets_the_column() {
        let dir = std::env::temp_dir().join(format!("kiln-db-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kilnd.db");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(&SCHEMA.replace(",\n    network_json TEXT NOT NULL DEFAULT ''", ""))
                .unwrap();
            old.execute(
                "INSERT INTO sandboxes (id, template_id, template_name, state, created_at,
                    expires_at, env_json, metadata_json, vcpus, mem_mib, dir, memory_from)
                 VALUES ('old', 't', 'py', 'paused', 1, 2, '{}', '{}', 1, 256, '/s', '/m')",
                [],
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        let rows = db.sandboxes().unwrap();
        assert_eq!(
            (rows[0].id.as_str(), rows[0].network_json.as_str()),
            ("old", "")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
