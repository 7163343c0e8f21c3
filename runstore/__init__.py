"""The run store: what every stage shares and none owns.

Cache keys and cached entries (`cache`), the tidy tables and their contract columns (`tables`), files written
whole or not at all (`atomic`), the mistakes a user can fix (`errors`) and the run directory's layout and lock
(`run_dir`). This is the ground floor (docs/ARCHITECTURE.md): it imports no stage package, and every stage may
import it.
"""
