-- relay schema on PostgreSQL, v20: the stamp of the subscriptions a transition fans out to, as sql/020 on SQLite
-- (relay.store.outbox.Subscribers): a new random stamp with every change fan-out would see, in the change's own
-- transaction. Once per statement: a change of many rows needs one new stamp. One row, held to one by its key
-- (which is also its replica identity, should the database publish its tables). TRUNCATE fires no DELETE
-- trigger, not even one FOR EACH STATEMENT: it has one of its own. The function finds the table by relay's
-- search_path, whoever's session changes the subscriptions. Writes made with triggers off
-- (session_replication_role = replica) are not seen: restart relay.
CREATE TABLE subscriptions_stamp (id INTEGER PRIMARY KEY CHECK (id = 1), stamp BIGINT NOT NULL);
INSERT INTO subscriptions_stamp (id, stamp) VALUES (1, floor(random() * 9.2e18)::bigint);   -- no two databases alike

CREATE FUNCTION relay_subscriptions_changed() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE subscriptions_stamp SET stamp = floor(random() * 9.2e18)::bigint;
    RETURN NULL;
END
$$;
CREATE TRIGGER subscriptions_changed AFTER INSERT OR DELETE OR UPDATE OF url, events, enabled ON subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION relay_subscriptions_changed();
CREATE TRIGGER subscriptions_truncated AFTER TRUNCATE ON subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION relay_subscriptions_changed();
