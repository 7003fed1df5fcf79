/* ctlive native core: public declarations. This text is also the cffi cdef,
 * so it must stay within what cffi's C parser accepts (no #include, no macros
 * with expressions). */
int ctl_version(void);
