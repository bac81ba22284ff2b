-- relay schema on PostgreSQL, v20: the stamp of the subscriptions a transition fans out to, as sql/020 on SQLite
-- (relay.store.outbox.Subscribers): a new random stamp with every change fan-out would see, in the change's own
-- transaction. Once per statement: a change of many rows needs one new stamp.
CREATE TABLE subscriptions_stamp (stamp BIGINT NOT NULL);
INSERT INTO subscriptions_stamp (stamp) VALUES (0);

CREATE FUNCTION relay_subscriptions_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE subscriptions_stamp SET stamp = floor(random() * 9.2e18)::bigint;
    RETURN NULL;
END
$$;
CREATE TRIGGER subscriptions_changed AFTER INSERT OR DELETE OR UPDATE OF url, events, enabled ON subscriptions
    FOR EACH STATEMENT EXECUTE FUNCTION relay_subscriptions_changed();
