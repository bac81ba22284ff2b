-- relay schema v20: a stamp of the subscriptions a transition fans out to (relay.store.outbox.Subscribers). Every
-- change fan-out would see (a subscription added or removed, its url, events or enabled changed) writes a new
-- random stamp in the change's own transaction; a transition reads the stamp with its task and reads the
-- subscriptions again only when it differs from the stamp of the ones it kept. Random, not counted up: a stamp
-- written by a transaction that rolled back is never written again by another.
-- One row, held to one by its key.
CREATE TABLE subscriptions_stamp (id INTEGER PRIMARY KEY CHECK (id = 1), stamp INTEGER NOT NULL);
INSERT INTO subscriptions_stamp (id, stamp) VALUES (1, random());     -- random from the start: no two databases alike
CREATE TRIGGER subscriptions_added AFTER INSERT ON subscriptions
BEGIN
    UPDATE subscriptions_stamp SET stamp = random();
END;
CREATE TRIGGER subscriptions_removed AFTER DELETE ON subscriptions
BEGIN
    UPDATE subscriptions_stamp SET stamp = random();
END;
CREATE TRIGGER subscriptions_changed AFTER UPDATE OF url, events, enabled ON subscriptions
BEGIN
    UPDATE subscriptions_stamp SET stamp = random();
END;
