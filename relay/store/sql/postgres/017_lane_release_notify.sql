-- relay schema on PostgreSQL, v17: a lane slot given back while a delivery on some replica waits for one (it marked
-- the held slots `wanted`: relay.store.deliveries.want_lane_slot) is told to every replica (NOTIFY relay_lanes,
-- delivered at commit), so the waiting delivery takes it at once instead of parking on a timer
-- (relay.deliveries.handler). Only then: a NOTIFY on every release cost a single process 6-10 % of its deliveries/s
-- (bench.fanout on PostgreSQL). The payload is the SHA-256 of the lane's UTF-8 (relay.store.deliveries.lane_notice;
-- not md5(), which hashes the server's encoding and fails under FIPS): a task webhook's lane holds its URL's origin,
-- which may be longer than NOTIFY's 8000 bytes (the release would fail) and may carry credentials.
ALTER TABLE lane_slots ADD COLUMN wanted INTEGER NOT NULL DEFAULT 0;

CREATE FUNCTION relay_lane_freed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('relay_lanes', encode(sha256(convert_to(NEW.lane, 'UTF8')), 'hex'));
    RETURN NULL;
END
$$;
CREATE TRIGGER lane_slots_freed AFTER UPDATE OF holder ON lane_slots FOR EACH ROW
    WHEN (OLD.holder IS NOT NULL AND NEW.holder IS NULL AND OLD.wanted = 1) EXECUTE FUNCTION relay_lane_freed();
