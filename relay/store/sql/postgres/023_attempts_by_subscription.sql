-- relay schema v23: each delivery attempt names its subscription (NULL for a task's own webhook_url), so the
-- console's delivery health and last error read the subscription's attempts in their window through
-- delivery_attempts_by_subscription. They found them through the subscription's deliveries, every one it ever
-- had: 119-133 ms per statement at 408,000 deliveries on SQLite, five statements per subscription per view of the
-- Subscriptions page, on the reader the API shares; the counts joined every delivery on PostgreSQL (145 ms).
ALTER TABLE delivery_attempts ADD COLUMN subscription_id TEXT;
-- Only the attempts of subscriptions' deliveries are written (a join, not a look-up per row).
UPDATE delivery_attempts a SET subscription_id = d.subscription_id
    FROM deliveries d WHERE d.id = a.delivery_id AND d.subscription_id IS NOT NULL;
CREATE INDEX delivery_attempts_by_subscription ON delivery_attempts (subscription_id, at);
