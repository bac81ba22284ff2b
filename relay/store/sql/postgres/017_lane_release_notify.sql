-- relay schema on PostgreSQL, v17: a lane slot given back is told to every replica (NOTIFY relay_lanes, the lane
-- as payload, delivered at commit), so a delivery another replica holds waiting for this subscriber's slot takes
-- it at once instead of parking on a timer (relay.deliveries.handler).
CREATE FUNCTION relay_lane_freed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('relay_lanes', NEW.lane);
    RETURN NULL;
END
$$;
CREATE TRIGGER lane_slots_freed AFTER UPDATE OF holder ON lane_slots FOR EACH ROW
    WHEN (OLD.holder IS NOT NULL AND NEW.holder IS NULL) EXECUTE FUNCTION relay_lane_freed();
