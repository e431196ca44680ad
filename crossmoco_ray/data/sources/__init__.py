"""Sources: every dataset format read as samples (id, points, views, label), checked as it is read."""
