-- relay schema v28 (SQLite; PostgreSQL's v27): a subscription's deliveries of one status, in id order. A page of
-- them (GET /v1/deliveries?subscription_id=&status=, what an integration polls for its failed deliveries) went
-- through the subscription's deliveries or through those of the status, and either can be the long walk: with
-- 300,000 deliveries, a subscription of 90,000 and a subscriber down with 60,000 failed, 18-43 ms a page on
-- SQLite, 26-28 ms on PostgreSQL. It also finds a subscription's pending deliveries when the subscription is
-- disabled, deleted or auto-disabled (queries.CANCEL_PENDING_DELIVERIES), which deliveries_pending_by_subscription
-- (v26) did: that one is dropped. A delivery's entry moves when its status changes, where the partial index's
-- went when the delivery settled.
CREATE INDEX deliveries_by_subscription_status ON deliveries (subscription_id, status, id);
DROP INDEX deliveries_pending_by_subscription;
