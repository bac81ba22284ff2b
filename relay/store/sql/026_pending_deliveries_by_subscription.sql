-- relay schema v26 (SQLite; PostgreSQL's v25): a subscription's pending deliveries, which its disabling, deletion
-- or auto-disable cancels (queries.CANCEL_PENDING_DELIVERIES) under the writer's lock, the last inside a shared
-- transaction of attempts and task transitions. Through deliveries_by_status it read every pending delivery of
-- every subscription: 36-38 ms at 20,000 pending, as when a subscriber is down. The index holds pending
-- deliveries only: each delivery adds an entry when made and removes it when settled.
CREATE INDEX deliveries_pending_by_subscription ON deliveries (subscription_id) WHERE status = 'pending';
