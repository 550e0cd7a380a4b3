-- A client store made by spa-server before per-client source networks (main at
-- 1c94838), dumped with sqlite3's iterdump; tests/unit/test_client_store.py opens it
-- with today's code.  Made in a checkout of 1c94838, in a new 0700 directory STATE, by
-- PYTHONPATH=. python make_old_store.py STATE, the script being:
--
--   import sys
--   from pathlib import Path
--   from spa.server.config import ClientEntry
--   from spa.store.clients import ClientStore
--
--   state = Path(sys.argv[1])
--   with ClientStore.open(state, create=True) as store:
--       store.add(ClientEntry("alice", bytes(range(32)), ("ssh", "https"),
--                             enrolled="2026-01-01T00:00:00Z", endpoint="203.0.113.1"), at=1.0)
--       store.add(ClientEntry("bob", bytes(range(1, 33)), ("ssh",), enrolled="2026-01-02T00:00:00Z",
--                             enroll_by="2026-01-03T00:00:00Z", otp_secret="JBSWY3DPEHPK3PXP"), at=2.0)
--       store.add(ClientEntry("carol", bytes(range(2, 34)), ("https",), allow_other_address=True,
--                             enrolled="2026-01-02T00:00:00Z"), at=3.0)
--       store.set_revoked("carol", close=True, at=4.0)
--       store.set_secret("alice", bytes(range(3, 35)), old_until="2026-02-01T00:00:00Z", at=5.0)
--       for line in store._db.iterdump():
--           print(line)
--
BEGIN TRANSACTION;
CREATE TABLE changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    at REAL NOT NULL
);
INSERT INTO "changes" VALUES(1,'alice',1.0);
INSERT INTO "changes" VALUES(2,'bob',2.0);
INSERT INTO "changes" VALUES(3,'carol',3.0);
INSERT INTO "changes" VALUES(4,'carol',4.0);
INSERT INTO "changes" VALUES(5,'alice',5.0);
CREATE TABLE clients (
    name TEXT PRIMARY KEY,
    secret BLOB NOT NULL,
    services TEXT NOT NULL,
    allow_other_address INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0,
    enrolled TEXT NOT NULL DEFAULT '',
    enroll_by TEXT NOT NULL DEFAULT '',
    otp_secret TEXT NOT NULL DEFAULT '',
    close_leases INTEGER NOT NULL DEFAULT 0,
    endpoint TEXT NOT NULL DEFAULT '',
    old_secret BLOB NOT NULL DEFAULT x'',
    old_until TEXT NOT NULL DEFAULT ''
);
INSERT INTO "clients" VALUES('alice',X'030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F202122','["ssh", "https"]',0,0,'2026-01-01T00:00:00Z','','',0,'203.0.113.1',X'000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F','2026-02-01T00:00:00Z');
INSERT INTO "clients" VALUES('bob',X'0102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F20','["ssh"]',0,0,'2026-01-02T00:00:00Z','2026-01-03T00:00:00Z','JBSWY3DPEHPK3PXP',0,'',X'','');
INSERT INTO "clients" VALUES('carol',X'02030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F2021','["https"]',1,1,'2026-01-02T00:00:00Z','','',1,'',X'','');
CREATE INDEX clients_state ON clients(revoked, enroll_by, name);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('changes',5);
COMMIT;
