-- relay schema v27 (PostgreSQL; SQLite's v28): a subscription's deliveries of one status, in id order, for a page
-- of them (GET /v1/deliveries?subscription_id=&status=, what an integration polls for its failed deliveries) and
-- for its pending ones when the subscription is disabled, deleted or auto-disabled
-- (queries.CANCEL_PENDING_DELIVERIES), which deliveries_pending_by_subscription (v25) served: that one is dropped,
-- last (a DROP INDEX keeps every read of deliveries out until the migration commits). With 300,000 deliveries, a
-- subscription of 90,000 and a subscriber down with 60,000 failed, a small subscription's failed ones 0.46 → 0.15
-- ms. PostgreSQL takes the two columns as independent, so for a pair rare where each value alone is common (the
-- large subscription's few failed ones) its plan for the values walks the primary key backwards (28 ms there, as
-- before; an mcv statistics object on the pair did not change its pick): the page is planned without its values
-- (queries.GENERIC_PLAN, deliveries_listing), which takes this index (0.46 ms).
CREATE INDEX deliveries_by_subscription_status ON deliveries (subscription_id, status, id);
DROP INDEX deliveries_pending_by_subscription;
