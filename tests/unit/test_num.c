/* test_num.c - strict decimal parsing of command-line numbers (util/num.h). */
#include "test.h"
#include "util/num.h"

DS4_TEST(num_parse_long_takes_only_plain_decimals) {
    long v = 7;
    CHECK(ds4_parse_long("42", 0, 100, &v) == 0 && v == 42);
    CHECK(ds4_parse_long("-3", -5, 5, &v) == 0 && v == -3);
    CHECK(ds4_parse_long("007", 0, 10, &v) == 0 && v == 7);
    const char *bad[] = {"", "-", "+2", " 3", "3 ", "0x10", "1e3", "1.0", "3a", "99999999999999999999999", NULL};
    for (int i = 0; bad[i]; i++) {
        v = 123;
        CHECK(ds4_parse_long(bad[i], -1000, 1000, &v) == -1);
        CHECK_EQ_INT(v, 123); /* left alone */
    }
    CHECK(ds4_parse_long(NULL, 0, 1, &v) == -1);
    CHECK(ds4_parse_long("11", 0, 10, &v) == -1);
    CHECK(ds4_parse_long("-1", 0, 10, &v) == -1);
}

DS4_TEST(num_parse_double_takes_only_plain_decimals) {
    double v = 9;
    const struct { const char *s; double want; } ok[] = {
        {"0.5", 0.5}, {".5", 0.5}, {"5.", 5.0}, {"1e-3", 1e-3}, {"2E+1", 20.0}, {"-0.25", -0.25}, {"1e-400", 0.0}};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        CHECK(ds4_parse_double(ok[i].s, -100, 100, &v) == 0);
        CHECK_NEAR(v, ok[i].want, 0.0);
    }
    const char *bad[] = {"", ".", "-", "e3", "1e", "1e+", "+1", " 1", "1 ", "0x1p-2", "inf", "nan", "1e400",
                         "1,5", "1.2.3", NULL};
    for (int i = 0; bad[i]; i++) {
        v = 9;
        CHECK(ds4_parse_double(bad[i], -1e300, 1e300, &v) == -1);
        CHECK_NEAR(v, 9.0, 0.0);
    }
    CHECK(ds4_parse_double("1.5", 0, 1, &v) == -1);
    CHECK(ds4_parse_double(NULL, 0, 1, &v) == -1);
}
