"""adderjax."""
