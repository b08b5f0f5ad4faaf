"""Types shared by every hangar package."""
