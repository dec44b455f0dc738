"""Engine processes and where they run: the client, supervisor, guard, launcher, fleet
and discovery."""
