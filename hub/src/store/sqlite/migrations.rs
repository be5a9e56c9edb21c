//! The schema, as migrations applied in order by `user_version`: a file is moved forward one
//! transaction per step, and a file from a newer hub is refused.

/// Schema migrations, applied in order; the index + 1 is the schema version.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: source side.
    "CREATE TABLE snapshots (
        bundle TEXT NOT NULL,
        generation INTEGER NOT NULL,
        digest BLOB NOT NULL,
        git_commit TEXT NOT NULL,
        git_ref TEXT NOT NULL,
        header BLOB NOT NULL,
        signature BLOB NOT NULL,
        body BLOB NOT NULL,
        object_count INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (bundle, generation)
    );
    CREATE INDEX snapshots_by_digest ON snapshots (digest);
    CREATE TABLE generations (bundle TEXT PRIMARY KEY, last INTEGER NOT NULL);
    CREATE TABLE renders (
        bundle TEXT NOT NULL,
        tree_id TEXT NOT NULL,
        selector TEXT NOT NULL,
        generation INTEGER NOT NULL,
        PRIMARY KEY (bundle, tree_id, selector)
    );
    CREATE TABLE refs (
        source TEXT NOT NULL,
        name TEXT NOT NULL,
        git_commit TEXT NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (source, name)
    );
    CREATE TABLE releases (
        source TEXT NOT NULL,
        git_ref TEXT NOT NULL,
        bundle TEXT NOT NULL,
        git_commit TEXT NOT NULL,
        generation INTEGER,
        error TEXT,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (source, git_ref, bundle)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        message TEXT NOT NULL
    );",
    // 2: agents, their labels, enrolment tokens.
    "CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        public_key BLOB NOT NULL UNIQUE,
        enrolled_at INTEGER NOT NULL,
        last_seen INTEGER,
        revoked_at INTEGER,
        revoked_by TEXT,
        revoked_why TEXT
    );
    CREATE TABLE agent_labels (
        agent TEXT NOT NULL REFERENCES agents (id),
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (agent, key)
    );
    CREATE TABLE enrolment_tokens (
        digest BLOB PRIMARY KEY,
        labels TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER,
        used_by TEXT
    );",
    // 3: a release per render variant (overlays and substituted labels).
    "CREATE TABLE releases_v3 (
        source TEXT NOT NULL,
        git_ref TEXT NOT NULL,
        bundle TEXT NOT NULL,
        variant TEXT NOT NULL,
        git_commit TEXT NOT NULL,
        generation INTEGER,
        error TEXT,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (source, git_ref, bundle, variant)
    );
    INSERT INTO releases_v3 SELECT source, git_ref, bundle, '', git_commit, generation, error, updated_at FROM releases;
    DROP TABLE releases;
    ALTER TABLE releases_v3 RENAME TO releases;",
    // 4: serving agents: assignments, the status they report, what they run.
    "ALTER TABLE agents ADD COLUMN agent_version TEXT;
    ALTER TABLE agents ADD COLUMN assignment_sequence INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN status_sequence INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE assignments (
        agent TEXT NOT NULL REFERENCES agents (id),
        bundle TEXT NOT NULL,
        generation INTEGER NOT NULL,
        digest BLOB NOT NULL,
        origin TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (agent, bundle)
    );
    CREATE TABLE bundle_status (
        agent TEXT NOT NULL REFERENCES agents (id),
        bundle TEXT NOT NULL,
        digest BLOB NOT NULL,
        generation INTEGER NOT NULL,
        phase TEXT NOT NULL,
        objects_total INTEGER NOT NULL,
        objects_ready INTEGER NOT NULL,
        message TEXT NOT NULL,
        observed_at INTEGER NOT NULL,
        stale INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        PRIMARY KEY (agent, bundle)
    );
    CREATE TABLE status_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent TEXT NOT NULL,
        bundle TEXT NOT NULL,
        generation INTEGER NOT NULL,
        phase TEXT NOT NULL,
        message TEXT NOT NULL,
        observed_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL
    );",
    // 5: rollouts: the state machine of each, stored whole after every step.
    "CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY,
        bundle TEXT NOT NULL,
        phase TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX rollouts_by_bundle ON rollouts (bundle, id);",
    // 6: operators' API tokens (hashes only), and the snapshots each agent was assigned lately
    // (the only delta bases the hub compresses against for it).
    "CREATE TABLE admin_tokens (
        name TEXT PRIMARY KEY,
        digest BLOB NOT NULL UNIQUE,
        role TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER,
        revoked_by TEXT,
        last_used_at INTEGER
    );
    CREATE TABLE assignment_bases (
        agent TEXT NOT NULL,
        bundle TEXT NOT NULL,
        digest BLOB NOT NULL,
        assigned_at INTEGER NOT NULL,
        PRIMARY KEY (agent, bundle, digest)
    );
    INSERT OR IGNORE INTO assignment_bases (agent, bundle, digest, assigned_at)
        SELECT agent, bundle, digest, updated_at FROM assignments;",
    // 7: the fleet at scale: each agent's labels also as one canonical JSON text (the distinct
    // label sets, or every agent's labels, in one scan), and assignments by bundle and origin.
    "ALTER TABLE agents ADD COLUMN label_set TEXT NOT NULL DEFAULT '{}';
    UPDATE agents SET label_set = COALESCE(
        (SELECT json_group_object(key, value) FROM
            (SELECT key, value FROM agent_labels WHERE agent = agents.id ORDER BY key)),
        '{}');
    CREATE INDEX agents_by_label_set ON agents (label_set) WHERE revoked_at IS NULL;
    CREATE INDEX assignments_by_bundle_origin ON assignments (bundle, origin);
    CREATE INDEX assignment_bases_by_agent ON assignment_bases (agent, bundle, assigned_at);",
    // 8: fleet views: agents by label (filters and counts by key and value).
    "CREATE INDEX agent_labels_by_key_value ON agent_labels (key, value);",
    // 9: rollouts at scale: members and history in tables of their own (a step writes the
    // members it changed and the records it added; the head keeps its counts for lists and a
    // version against lost updates), and a change feed: a counter bumped by every write that
    // concerns an agent (enrolled, labelled, revoked, assigned) or its reports, so a rollout
    // step reads only what changed.
    "CREATE TABLE rollout_members (
        rollout INTEGER NOT NULL,
        agent TEXT NOT NULL,
        state TEXT NOT NULL,
        member TEXT NOT NULL,
        PRIMARY KEY (rollout, agent)
    );
    INSERT INTO rollout_members (rollout, agent, state, member)
        SELECT r.id, m.key, json_extract(m.value, '$.state'), m.value
        FROM rollouts r, json_each(r.state, '$.members') m;
    CREATE TABLE rollout_log (
        rollout INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        who TEXT NOT NULL,
        action TEXT NOT NULL,
        why TEXT NOT NULL,
        PRIMARY KEY (rollout, seq)
    );
    INSERT INTO rollout_log (rollout, seq, at, who, action, why)
        SELECT r.id, l.key, json_extract(l.value, '$.at'), json_extract(l.value, '$.who'),
               json_extract(l.value, '$.action'), json_extract(l.value, '$.why')
        FROM rollouts r, json_each(r.state, '$.log') l;
    ALTER TABLE rollouts ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
    UPDATE rollouts SET created_by = COALESCE(json_extract(state, '$.log[0].who'), '');
    UPDATE rollouts SET state = json_remove(state, '$.members', '$.log');
    ALTER TABLE rollouts ADD COLUMN progress TEXT;
    ALTER TABLE rollouts ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE change_counter (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
    INSERT INTO change_counter (id, value) VALUES (1, 0);
    ALTER TABLE agents ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE bundle_status ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX agents_by_change ON agents (change_seq);
    CREATE INDEX bundle_status_by_change ON bundle_status (change_seq);",
    // 10: retention: each body stored once by digest (a snapshot signed again, as a roll back
    // does, shares it), and indexes for pruning by age and for finding what references a
    // snapshot.
    "CREATE TABLE bodies (digest BLOB PRIMARY KEY, body BLOB NOT NULL);
    INSERT OR IGNORE INTO bodies (digest, body) SELECT digest, body FROM snapshots;
    ALTER TABLE snapshots DROP COLUMN body;
    CREATE INDEX assignment_bases_by_digest ON assignment_bases (bundle, digest);
    CREATE INDEX assignments_by_generation ON assignments (bundle, generation);
    CREATE INDEX status_history_by_received ON status_history (received_at);
    CREATE INDEX events_by_at ON events (at);",
    // 11: fleet counts without joins: each assignment carries the phase its agent last
    // reported for the bundle (kept by triggers), revoked agents are found by an index of
    // their own, and labels are counted from an index that covers them.
    "ALTER TABLE assignments ADD COLUMN phase TEXT;
    UPDATE assignments SET phase = (SELECT s.phase FROM bundle_status s
        WHERE s.agent = assignments.agent AND s.bundle = assignments.bundle);
    CREATE INDEX assignments_by_phase ON assignments (bundle, phase, agent);
    CREATE TRIGGER assignment_phase_on_insert AFTER INSERT ON assignments
    BEGIN
        UPDATE assignments SET phase = (SELECT s.phase FROM bundle_status s
            WHERE s.agent = NEW.agent AND s.bundle = NEW.bundle)
        WHERE agent = NEW.agent AND bundle = NEW.bundle;
    END;
    CREATE TRIGGER assignment_phase_on_report AFTER INSERT ON bundle_status
    BEGIN
        UPDATE assignments SET phase = NEW.phase WHERE agent = NEW.agent AND bundle = NEW.bundle;
    END;
    CREATE TRIGGER assignment_phase_on_new_report AFTER UPDATE OF phase ON bundle_status
    BEGIN
        UPDATE assignments SET phase = NEW.phase WHERE agent = NEW.agent AND bundle = NEW.bundle;
    END;
    CREATE INDEX agents_revoked ON agents (revoked_at) WHERE revoked_at IS NOT NULL;
    DROP INDEX agent_labels_by_key_value;
    CREATE INDEX agent_labels_by_key_value ON agent_labels (key, value, agent);",
    // 12: notifications: how far each receiver has been sent the event log.
    "CREATE TABLE notify_cursors (
        receiver TEXT PRIMARY KEY,
        last_event INTEGER NOT NULL
    );",
    // 13: drift the agents found: every report, and where each agent's bundle stands.
    "CREATE TABLE drift_reports (
        id INTEGER PRIMARY KEY,
        agent TEXT NOT NULL,
        bundle TEXT NOT NULL,
        generation INTEGER NOT NULL,
        action TEXT NOT NULL,
        objects INTEGER NOT NULL,
        findings TEXT NOT NULL,
        observed_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL
    );
    CREATE INDEX drift_reports_by_agent ON drift_reports (agent, id);
    CREATE INDEX drift_reports_by_bundle ON drift_reports (bundle, id);
    CREATE INDEX drift_reports_by_time ON drift_reports (received_at);
    CREATE TABLE drift_state (
        agent TEXT NOT NULL,
        bundle TEXT NOT NULL,
        left_objects INTEGER NOT NULL DEFAULT 0,
        left_since INTEGER,
        corrected_objects INTEGER NOT NULL DEFAULT 0,
        corrected_at INTEGER,
        PRIMARY KEY (agent, bundle)
    );
    CREATE INDEX drift_state_left ON drift_state (agent) WHERE left_objects > 0;",
    // 14: an agent's rollouts (its history, its details) without a scan of every member of every
    // rollout.
    "CREATE INDEX rollout_members_by_agent ON rollout_members (agent, rollout);",
];
