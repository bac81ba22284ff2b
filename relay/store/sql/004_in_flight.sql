-- Tasks whose submit has started but which the provider has not answered yet: counted against
-- providers.NAME.max_in_flight without walking the whole pending backlog.
CREATE INDEX tasks_submitting ON tasks (provider) WHERE status = 'pending' AND submit_started_at IS NOT NULL;
