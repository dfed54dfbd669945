"""Attacks on an adapted learner: PGD/FGSM/APGD, aimed and alone attacks, AutoAttack (APGD-CE, APGD-T, FAB-T, Square)."""
